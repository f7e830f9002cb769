"""The --keep-recognisable filter: which pairs it keeps, where the dropped ones go, what it reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from defect_ds.generate import filter as quality_filter


def _sample(out: Path, key: str, defect_type: str, brightness: int) -> None:
    """A pair whose mask holds pixels of `brightness` on a dark source."""
    folder = out / "samples" / key
    folder.mkdir(parents=True)
    source = np.zeros((16, 16, 3), np.uint8)
    image = source.copy()
    mask = np.zeros((16, 16), np.uint8)
    mask[6:9, 3:12] = 1
    image[mask.astype(bool)] = brightness
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(source).save(folder / "source.png")
    Image.fromarray(mask * 255).save(folder / "mask.png")
    (folder / "json").write_text(json.dumps({"defect_type": defect_type}))


def _brightness_judge(images: np.ndarray) -> np.ndarray:
    """A stand-in judge: the probability of a defect is a pixel's brightness."""
    return images.mean(axis=-1) / 255.0


def test_the_filter_moves_unfound_pairs_to_dropped_and_a_rerun_sorts_again(tmp_path):
    for key, kind, level in [("s0", "scratch", 250), ("s1", "scratch", 60), ("c0", "crack", 200), ("c1", "crack", 10)]:
        _sample(tmp_path, key, kind, level)
    settings = quality_filter.JudgeSettings("shots", threshold=0.5)
    report = quality_filter.judge_samples(tmp_path, _brightness_judge, settings, 16)
    assert {k: s["kept"] for k, s in report["samples"].items()} == {"s0": True, "s1": False, "c0": True, "c1": False}
    assert report["per_type"] == {"crack": {"pairs": 2, "kept": 1, "dropped": 1, "found_on_source": 0},
                                  "scratch": {"pairs": 2, "kept": 1, "dropped": 1, "found_on_source": 0}}
    assert report["samples"]["s1"]["score"] == round(60 / 255, 4)
    quality_filter.apply(tmp_path, report)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["c0", "s0"]
    assert sorted(p.name for p in (tmp_path / "dropped").iterdir()) == ["c1", "s1"]
    assert json.loads((tmp_path / quality_filter.REPORT_FILE).read_text())["per_type"] == report["per_type"]
    assert "scratch kept 1 of 2" in quality_filter.summary(report)

    lower = quality_filter.JudgeSettings("shots", threshold=0.2)  # the dropped pairs are judged again
    report = quality_filter.judge_samples(tmp_path, _brightness_judge, lower, 16)
    quality_filter.apply(tmp_path, report)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["c0", "s0", "s1"]
    assert [p.name for p in (tmp_path / "dropped").iterdir()] == ["c1"]
