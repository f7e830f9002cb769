"""Shard writer: bounds, names, manifest counts, atomic writes; the manifest reader."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from defect_ds.data import MissingManifestError, read_manifest
from defect_ds.data import prepare
from defect_ds.data.prepare import Job, WriteOptions, write_dataset
from defect_ds.data.sample import Sample
from defect_ds.data.shards import ShardWriter, tar_file_bytes, tar_member_bytes


def sample(i: int, defect_type: str = "scratch", size: int = 16) -> Sample:
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))  # noise: incompressible
    return Sample(f"k-{i:04d}", image, Image.new("L", (size, size)), f"a {defect_type}",
                  {"defect_type": defect_type})


def test_shards_bounded_by_count_and_named(tmp_path):
    writer = ShardWriter(tmp_path, max_samples=3)
    for i in range(7):
        writer.write("train", sample(i).encode(), "scratch")
    writer.write("val", sample(9).encode(), "crack")
    shards = writer.close()
    assert [s["name"] for s in shards["train"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["samples"] for s in shards["train"]] == [3, 3, 1] and shards["val"][0]["counts"] == {"crack": 1}
    with tarfile.open(tmp_path / "train-000001.tar") as tar:
        assert sorted(tar.getnames())[:4] == ["k-0003.caption.txt", "k-0003.image.png", "k-0003.json",
                                              "k-0003.mask.png"]


@pytest.mark.parametrize("max_bytes", [10240, 30000, 40960])
def test_shards_bounded_by_bytes_with_tar_overhead(tmp_path, max_bytes):
    # ~3 kB of payload per 32 px noise sample, plus four 512-byte headers and block padding
    writer = ShardWriter(tmp_path, max_samples=1000, max_bytes=max_bytes)
    encoded = [sample(i, size=32).encode() for i in range(12)]
    for e in encoded:
        writer.write("train", e, "scratch")
    infos = writer.close()["train"]
    sizes = [(tmp_path / s["name"]).stat().st_size for s in infos]
    assert all(size <= max_bytes for size in sizes) and sum(s["samples"] for s in infos) == 12
    first = 0  # the writer's size accounting is exact, and a shard is closed only when the next sample would not fit
    for info, size in zip(infos, sizes):
        members = sum(tar_member_bytes(e) for e in encoded[first:first + info["samples"]])
        assert size == tar_file_bytes(members) == info["bytes"]
        first += info["samples"]
        if first < len(encoded):
            assert tar_file_bytes(members + tar_member_bytes(encoded[first])) > max_bytes
    assert len(infos) < 12 or max_bytes == 10240


def test_a_sample_larger_than_the_bound_gets_its_own_shard_and_a_warning(tmp_path, caplog):
    writer = ShardWriter(tmp_path, max_samples=1000, max_bytes=10240)
    for i, size in enumerate([8, 64, 8, 8]):  # 64 px of noise is ~12 kB: over 10240 bytes alone
        writer.write("train", sample(i, size=size).encode(), "scratch")
    infos = writer.close()["train"]
    assert [s["samples"] for s in infos] == [1, 1, 2] and infos[1]["bytes"] > 10240
    assert [r.getMessage().split()[1] for r in caplog.records if "alone" in r.getMessage()] == ["k-0001"]
    with pytest.raises(ValueError, match="max_bytes=9909 are invalid; use at least 1 sample and 10240 bytes"):
        ShardWriter(tmp_path, max_bytes=9909)


def test_manifest_counts_per_split_and_type(tmp_path):
    jobs = [Job(f"k-{i:04d}", t, "test", lambda i=i, t=t: sample(i, t))
            for i, t in enumerate(["scratch"] * 6 + ["crack"] * 3 + ["good"] * 3)]
    m = write_dataset(jobs, tmp_path, WriteOptions(val_fraction=0.34, max_samples_per_shard=4, progress=False),
                      defect_tokens={"scratch": "sks_scratch", "crack": "sks_crack"})
    assert m == read_manifest(tmp_path)
    assert m["counts"] == {"train": {"crack": 2, "good": 2, "scratch": 4}, "val": {"crack": 1, "good": 1, "scratch": 2}}
    assert sum(s["samples"] for s in m["shards"]["train"]) == 8 and m["kind"] == "images"
    assert all((tmp_path / s["name"]).stat().st_size == s["bytes"] for s in m["shards"]["train"])


def test_interrupted_write_leaves_no_complete_looking_shard_and_no_manifest(tmp_path, monkeypatch):
    jobs = [Job(f"k-{i:04d}", "scratch", "test", lambda i=i: sample(i)) for i in range(10)]
    options = WriteOptions(val_fraction=0, max_samples_per_shard=4, progress=False)
    real_with_split = prepare._with_split
    calls = []

    def interrupted(encoded, split):
        calls.append(encoded["__key__"])
        if len(calls) == 7:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while sample 6 was being written
        return real_with_split(encoded, split)

    monkeypatch.setattr(prepare, "_with_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(jobs, tmp_path, options, defect_tokens={})
    assert not (tmp_path / "manifest.json").exists()
    tars = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert tars == ["train-000000.tar"]  # the finished shard; the one being written is gone
    with tarfile.open(tmp_path / tars[0]) as tar:
        assert len(tar.getnames()) == 4 * 4
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*"))  # nor the spool
    with pytest.raises(MissingManifestError, match="run `defect-ds prepare synthetic"):
        read_manifest(tmp_path)


def test_interrupt_while_reading_inputs_writes_nothing(tmp_path):
    def boom():
        raise KeyboardInterrupt  # Ctrl-C while sample 6 was being read, before anything is written

    jobs = [Job(f"k-{i:04d}", "scratch", "test", (lambda i=i: sample(i)) if i != 6 else boom) for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        write_dataset(jobs, tmp_path, WriteOptions(val_fraction=0, max_samples_per_shard=4, progress=False),
                      defect_tokens={})
    assert list(tmp_path.iterdir()) == []


def test_a_shard_in_progress_has_a_temporary_name(tmp_path):
    writer = ShardWriter(tmp_path, max_samples=10)
    writer.write("train", sample(0).encode(), "scratch")
    assert not list(tmp_path.glob("*.tar")) and len(list(tmp_path.glob(".train-000000.tar.partial"))) == 1
    writer.close()
    assert [p.name for p in tmp_path.glob("*.tar")] == ["train-000000.tar"]


def test_read_manifest_errors(tmp_path):
    with pytest.raises(MissingManifestError, match=f"{tmp_path} has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
