"""`defect-ds export mvtec`: a generate folder written as an MVTec AD tree, read back by `prepare mvtec`
with keys (through index.csv), types, images and masks intact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_ds.cli import main
from defect_ds.data.mvtec import read_index
from defect_ds.data.reader import iter_dataset, load_mask, load_rgb
from defect_ds.generate.output import write_sample
from defect_ds.generate.spec import GenerationSettings, SampleSpec

SIZE = 32


@pytest.fixture
def generated(tmp_path) -> tuple[Path, dict[str, tuple[str, str, np.ndarray, np.ndarray]]]:
    """A folder as `defect-ds generate` writes it (its own writer), two categories, two defect types."""
    out, rng, truth = tmp_path / "gen", np.random.default_rng(0), {}
    settings = GenerationSettings(resolution_px=SIZE)
    for i, (category, defect_type) in enumerate([("pill", "scratch"), ("pill", "crack"), ("pill", "scratch"),
                                                  ("screw", "scratch")]):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[rng.integers(0, 16):, i + 3] = 1  # thin and off-centre: a resize would lose or move it
        spec = SampleSpec(key=f"{defect_type}-{i:06d}", defect_type=defect_type, token=f"sks_{defect_type}",
                          prompt=f"a photo of a {category} with a sks_{defect_type}", seed=i, category=category,
                          mask=mask, mask_origin="test")
        write_sample(out, spec, image, settings)
        truth[spec.key] = (category, defect_type, image, mask)
    return out, truth


@pytest.fixture
def good_data(tmp_path) -> Path:
    out = tmp_path / "good"
    assert main(["prepare", "synthetic", str(out), "--resolution-px", str(SIZE), "--per-defect", "0",
                 "--good-per-category", "5", "--categories", "pill,surface", "--val-fraction", "0.4",
                 "--no-progress"]) == 0
    return out


def test_export_round_trips_through_prepare_mvtec(generated, good_data, tmp_path, capsys):
    gen, truth = generated
    out = tmp_path / "mvtec"
    assert main(["export", "mvtec", str(gen), str(out), "--good", str(good_data)]) == 0
    pill = out / "pill"
    assert sorted(p.name for p in (pill / "test").iterdir()) == ["crack", "good", "scratch"]
    assert sorted(p.name for p in (pill / "test" / "scratch").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.name for p in (pill / "ground_truth" / "scratch").iterdir()) == ["000_mask.png", "001_mask.png"]
    assert len(list((pill / "train" / "good").glob("*.png"))) == 3  # 5 good: 3 train, 2 val -> test/good
    assert len(list((pill / "test" / "good").glob("*.png"))) == 2
    assert (out / "screw" / "train" / "good").is_dir()  # present, empty: no good screw images given
    assert not (out / "surface").exists()  # good images of a category without generated pairs stay out
    mask_file = Image.open(pill / "ground_truth" / "crack" / "000_mask.png")
    assert mask_file.mode == "L" and mask_file.size == (SIZE, SIZE)
    assert set(np.unique(np.asarray(mask_file))) == {0, 255}

    index = {(row["category"], row["image"]): row for row in read_index(out)}
    for category in ("pill", "screw"):
        back = tmp_path / f"back-{category}"
        assert main(["prepare", "mvtec", str(out), "--category", category, str(back), "--val-fraction", "0",
                     "--no-progress"]) == 0
        for sample in iter_dataset(back):
            meta = sample["meta"]
            relative = Path(meta["source"]).relative_to(out)  # <category>/<split>/<type>/NNN.png
            split_dir, stem = relative.parts[1], relative.stem
            row = index[(category, relative.as_posix())]
            assert relative.parts[2] == meta["defect_type"]
            assert sample["key"] == f"mvtec-{category}-{split_dir}-{meta['defect_type']}-{stem}"
            if meta["defect_type"] == "good":
                continue
            want_category, want_type, image, mask = truth.pop(row["key"])
            assert (meta["category"], meta["defect_type"]) == (want_category, want_type)
            np.testing.assert_array_equal(load_rgb(sample["image"]), image)
            np.testing.assert_array_equal(load_mask(sample["mask"]), mask)
    assert not truth  # every generated pair came back


def test_refuses_a_full_folder_and_a_defect_without_mask(generated, tmp_path, capsys):
    gen, _ = generated
    out = tmp_path / "mvtec"
    (out / "x").mkdir(parents=True)
    assert main(["export", "mvtec", str(gen), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "x").is_dir()  # left as it was
    folder = next((gen / "samples").iterdir())
    (folder / "mask.png").unlink()
    assert main(["export", "mvtec", str(gen), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "without a mask" in err and str(folder) in err
    assert (out / "x").is_dir()  # a failed export leaves the old tree


def test_counts_per_folder_and_an_index_row_per_sample(generated, tmp_path):
    from defect_ds.data.mvtec import write_mvtec

    gen, truth = generated
    counts = write_mvtec(gen, tmp_path / "mvtec")
    assert counts == {"pill": {"test/scratch": 2, "test/crack": 1}, "screw": {"test/scratch": 1}}
    rows = read_index(tmp_path / "mvtec")
    assert sorted(r["key"] for r in rows) == sorted(truth)
    for row in rows:
        meta = json.loads((gen / "samples" / row["key"] / "json").read_text())
        assert (row["category"], row["defect_type"]) == (meta["category"], meta["defect_type"])
        assert row["caption"] == (gen / "samples" / row["key"] / "caption.txt").read_text()
