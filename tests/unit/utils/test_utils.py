"""The small shared helpers: atomic files and folders, device and dtype choice, free ports."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from defect_ds.utils.device import cpu_has_native_bf16, cpu_name, resolve_device, resolve_dtype
from defect_ds.utils.files import (DiskFullError, atomic_folder, atomic_write_bytes, atomic_write_json,
                                   atomic_write_text)
from defect_ds.utils.net import free_port


def test_atomic_folder_replaces_the_old_folder_whole(tmp_path):
    final = tmp_path / "export"
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not final.exists()  # nothing visible until the block ends
    with atomic_folder(final) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary or old folder left


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    final = tmp_path / "samples" / "k-000001"
    with atomic_folder(final) as tmp:
        (tmp / "json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "json").write_text("half")
            raise RuntimeError("interrupted")
    assert (final / "json").read_text() == "{}"
    with atomic_folder(final) as tmp:  # the next call clears the leftover
        (tmp / "json").write_text("new")
    assert (final / "json").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["k-000001"]


def test_atomic_writes_replace_the_file_whole(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    atomic_write_bytes(tmp_path / "x.bin", b"\0\1")
    assert (tmp_path / "x.bin").read_bytes() == b"\0\1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "x.bin"]  # no temporary left


def test_a_full_disk_keeps_the_old_file_and_says_so_in_one_sentence(tmp_path, full_disk):
    path = tmp_path / "downstream.json"
    atomic_write_json(path, {"old": True})
    full_disk.fill()
    with pytest.raises(DiskFullError) as e:
        atomic_write_json(path, {"new": "x" * 10_000})  # a plain write would leave 4096 bytes of it
    assert str(e.value) == (f"No space left while writing {path}; nothing there was changed; free space and "
                            "rerun.")
    assert path.read_text() == '{\n  "old": true\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downstream.json"]
    with pytest.raises(DiskFullError, match=r"writing .*k-000001; nothing there was changed; resume"):
        with atomic_folder(tmp_path / "k-000001", advice="resume") as tmp:
            (tmp / "image.png").write_bytes(b"x" * 5000)
    assert not (tmp_path / "k-000001").exists()


def test_device_and_dtype_rules():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    native = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # avx512_bf16 or AMX
    assert resolve_dtype("auto", torch.device("cpu")) == native
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(ValueError, match="use auto, bf16 or fp32"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_cpu_name_reads_the_model_name(monkeypatch, tmp_path):
    from defect_ds.perf import sweep

    assert sweep.cpu_name is cpu_name  # benchmarks import it from the sweep command
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\nflags\t: avx\n")
    real_path = Path

    def fake_path(name, *rest):
        return cpuinfo if name == "/proc/cpuinfo" else real_path(name, *rest)

    monkeypatch.setattr("defect_ds.utils.device.Path", fake_path)
    assert cpu_name() == "Test CPU @ 2.0GHz (no native bf16)"
    # the kind that decides bf16's speed and the last bits of results, named in every record
    assert cpu_name("model name\t: Xeon\nflags\t: avx2 avx512f avx512_bf16 amx_bf16\n") == "Xeon (amx_bf16)"
    assert cpu_name("model name\t: EPYC\nflags\t: avx2 avx512f avx512_bf16\n") == "EPYC (avx512_bf16)"
    assert cpu_name("model name\t: EPYC\nflags\t: avx2\n") == "EPYC (no native bf16, avx2)"
