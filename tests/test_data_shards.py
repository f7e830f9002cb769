"""Shard writer: bounds, names, manifest counts, atomic writes; the manifest reader."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from defect_ds.data import MissingManifestError, read_manifest
from defect_ds.data.prepare import Job, WriteOptions, write_dataset
from defect_ds.data.sample import Sample
from defect_ds.data.shards import ShardWriter


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


def test_shards_bounded_by_bytes(tmp_path):
    one = sum(len(v) for k, v in sample(0, size=32).encode().items() if not k.startswith("_"))
    writer = ShardWriter(tmp_path, max_samples=1000, max_bytes=int(one * 2.5))
    for i in range(5):
        writer.write("train", sample(i, size=32).encode(), "scratch")
    assert [s["samples"] for s in writer.close()["train"]] == [2, 2, 1]


def test_manifest_counts_per_split_and_type(tmp_path):
    jobs = [Job(f"k-{i:04d}", t, "test", lambda i=i, t=t: sample(i, t))
            for i, t in enumerate(["scratch"] * 6 + ["crack"] * 3 + ["good"] * 3)]
    m = write_dataset(jobs, tmp_path, WriteOptions(val_fraction=0.34, max_samples_per_shard=4, progress=False),
                      defect_tokens={"scratch": "sks_scratch", "crack": "sks_crack"})
    assert m == read_manifest(tmp_path)
    assert m["counts"] == {"train": {"crack": 2, "good": 2, "scratch": 4}, "val": {"crack": 1, "good": 1, "scratch": 2}}
    assert sum(s["samples"] for s in m["shards"]["train"]) == 8 and m["kind"] == "images"
    assert all((tmp_path / s["name"]).stat().st_size == s["bytes"] for s in m["shards"]["train"])


def test_interrupted_write_leaves_no_complete_looking_shard_and_no_manifest(tmp_path):
    def boom():
        raise KeyboardInterrupt  # the user pressed Ctrl-C while sample 6 was being read

    jobs = [Job(f"k-{i:04d}", "scratch", "test", (lambda i=i: sample(i)) if i != 6 else boom) for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        write_dataset(jobs, tmp_path, WriteOptions(val_fraction=0, max_samples_per_shard=4, progress=False),
                      defect_tokens={})
    assert not (tmp_path / "manifest.json").exists()
    tars = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert tars == ["train-000000.tar"]  # the finished shard; the one being written is gone
    with tarfile.open(tmp_path / tars[0]) as tar:
        assert len(tar.getnames()) == 4 * 4
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(MissingManifestError, match="run `defect-ds prepare synthetic"):
        read_manifest(tmp_path)


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
