"""The embedded synthetic data set: exact masks, determinism, any resolution, captions, the CLI."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from defect_ds.cli import main
from defect_ds.data import read_manifest, synthetic
from defect_ds.data.sample import GOOD

TOKENS = {"crack": "sks_crack", "scratch": "sks_scratch", "spot": "sks_spot"}


@pytest.mark.parametrize("category", list(synthetic.CATEGORIES))
@pytest.mark.parametrize("defect_type", list(synthetic.DEFECT_TYPES))
def test_defect_is_painted_exactly_where_the_mask_is(category, defect_type):
    for i in range(3):
        rng = np.random.default_rng([7, i])
        image, mask, base, _ = synthetic.draw_sample(category, defect_type, rng, 40)
        changed = (image != base).any(-1)
        assert mask.sum() >= 3
        assert not (changed & ~mask).any()  # nothing outside the mask changed
        assert changed[mask].mean() > 0.9  # and (nearly) every mask pixel did


def test_good_samples_have_empty_masks_and_no_token():
    sample = synthetic.make_sample("pill", GOOD, 0, resolution_px=32, seed=0, tokens=TOKENS)
    assert np.asarray(sample.mask).max() == 0 and "sks_" not in sample.caption
    assert sample.caption == "a photo of a pill"


def test_captions_use_one_token_per_defect_type():
    for defect_type in synthetic.DEFECT_TYPES:
        s = synthetic.make_sample("screw", defect_type, 1, resolution_px=32, seed=0, tokens=TOKENS)
        assert TOKENS[defect_type] in s.caption and s.caption.startswith("a photo of a screw head with")
        assert sum(tok in s.caption for tok in TOKENS.values()) == 1
    scratch = synthetic.make_sample("pill", "scratch", 0, resolution_px=32, seed=0, tokens=TOKENS)
    assert scratch.record["detail"] in scratch.caption.split()  # "with vertical sks_scratch"


def test_deterministic_for_a_seed_and_any_resolution():
    a = synthetic.make_sample("surface", "crack", 2, resolution_px=48, seed=1, tokens=TOKENS).encode()
    b = synthetic.make_sample("surface", "crack", 2, resolution_px=48, seed=1, tokens=TOKENS).encode()
    c = synthetic.make_sample("surface", "crack", 2, resolution_px=48, seed=2, tokens=TOKENS).encode()
    assert a == b and a["image.png"] != c["image.png"]
    for size in (17, 100):
        s = synthetic.make_sample("pill", "spot", 0, resolution_px=size, seed=0, tokens=TOKENS)
        assert s.image.size == s.mask.size == (size, size) and np.asarray(s.mask).max() == 255


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_prepare_synthetic_cli(tmp_path, capsys):
    args = ["prepare", "synthetic", "--resolution-px", "32", "--per-defect", "4", "--good-per-category", "2",
            "--categories", "pill,surface", "--val-fraction", "0.25", "--shard-max-samples", "10",
            "--token", "crack=<crk>", "--no-progress"]
    assert main(args + [str(tmp_path / "a")]) == 0
    assert main(args + [str(tmp_path / "b")]) == 0
    manifest = read_manifest(tmp_path / "a")
    assert manifest["defect_tokens"] == {"crack": "<crk>", "scratch": "sks_scratch", "spot": "sks_spot"}
    # per category: 4 of each of 3 defect types + 2 good; 25% of each type (stratified) in val
    assert manifest["counts"] == {"train": {"crack": 6, "good": 3, "scratch": 6, "spot": 6},
                                  "val": {"crack": 2, "good": 1, "scratch": 2, "spot": 2}}
    assert [s["samples"] for s in manifest["shards"]["train"]] == [10, 10, 1]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # byte-identical shards for the same seed
    with tarfile.open(tmp_path / "a" / "val-000000.tar") as tar:
        names = tar.getnames()
        record = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
    key = names[0].split(".")[0]
    assert {f"{key}.{f}" for f in ("image.png", "mask.png", "caption.txt", "json")} <= set(names)
    assert {"category", "defect_type", "source", "split", "size"} <= set(record) and record["split"] == "val"
    assert "train" in capsys.readouterr().err  # the report table
    assert main(args + [str(tmp_path / "a")]) == 2  # refuses to write over shards without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_synthetic_sample_bytes_decode_as_documented():
    from PIL import Image

    enc = synthetic.make_sample("pill", "scratch", 0, resolution_px=32, seed=0, tokens=TOKENS).encode()
    image, mask = Image.open(io.BytesIO(enc["image.png"])), Image.open(io.BytesIO(enc["mask.png"]))
    assert image.mode == "RGB" and mask.mode == "L"
    assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}
