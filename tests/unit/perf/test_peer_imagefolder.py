"""benchmarks/peer_imagefolder.py: the shards' training images and captions, as the peer's imagefolder."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from defect_ds.data.reader import iter_dataset


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("benchmarks/peer_imagefolder.py")


def test_every_training_sample_is_written_with_its_caption(script, make_synthetic, tmp_path):
    data = make_synthetic(tmp_path / "data", resolution_px=32, per_defect=2, good_per_category=1)
    train = list(iter_dataset(data, splits=("train",)))
    assert script.main([str(data), str(tmp_path / "folder")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "folder" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [s["caption"] for s in train] and len(rows) > 1
    assert all("sks_" in r["text"] for r in rows if "with" in r["text"])
    with Image.open(tmp_path / "folder" / rows[0]["file_name"]) as image:
        assert image.size == (32, 32)


def test_a_folder_already_holding_files_is_refused_in_one_sentence(script, make_synthetic, tmp_path, capsys):
    data = make_synthetic(tmp_path / "data")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "other.png").write_bytes(b"x")
    assert script.main([str(data), str(tmp_path / "folder")]) == 2
    assert capsys.readouterr().err.strip().endswith("folder is not empty; pass a new folder.")
