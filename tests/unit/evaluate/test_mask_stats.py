"""Mask statistics of the evaluation report: each one measures what its name says, per type and set."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defect_ds.evaluate.mask_stats import compare_masks, mask_shape, masks_markdown, save_mask_figure


def _disc(cy: int, cx: int, r: int, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def test_area_elongation_components_and_position():
    bar = np.zeros((64, 64), np.uint8)
    bar[20:22, 10:50] = 1
    disc = _disc(32, 32, 8)
    assert mask_shape(bar)["area"] == pytest.approx(80 / 64 ** 2)
    assert mask_shape(bar)["elongation"] > 10 and mask_shape(disc)["elongation"] < 1.1
    assert mask_shape(bar)["components"] == 1
    assert mask_shape(_disc(10, 10, 3) | _disc(50, 50, 3))["components"] == 2
    diagonal = np.zeros((64, 64), np.uint8)
    diagonal[[5, 6, 7], [5, 6, 7]] = 1
    assert mask_shape(diagonal)["components"] == 1  # 8-connected: a thin diagonal scratch is one defect
    region = np.zeros((64, 64), bool)
    region[16:48, 0:64] = True  # the object: a band; positions are within its bounding box
    s = mask_shape(_disc(20, 48, 2), region)
    assert s["position_y"] == pytest.approx((20.5 - 16) / 32) and s["position_x"] == pytest.approx(48.5 / 64)
    assert mask_shape(np.zeros((64, 64), np.uint8)) is None


def test_comparison_table_and_figure(tmp_path):
    image = np.full((64, 64, 3), 20, np.uint8)
    image[8:56, 8:56] = 200  # a square object

    def sample(mask, defect_type="scratch"):
        return {"defect_type": defect_type, "mask": mask, "image": image, "source": None}

    real = [sample(_disc(20, 20, 3)), sample(_disc(40, 40, 3))]
    generated = [sample(_disc(30, 30, 9)), sample(_disc(30, 30, 9) | _disc(50, 12, 2)),
                 sample(np.zeros((64, 64), np.uint8))]  # an empty mask is left out
    comparison = compare_masks(generated, real, ["scratch"])
    gen, rea = comparison["scratch"]["generated"], comparison["scratch"]["real"]
    assert gen["num_masks"] == 2 and rea["num_masks"] == 2
    assert gen["area_mean"] > 5 * rea["area_mean"] and gen["components_mean"] == 1.5 and rea["components_std"] == 0
    assert rea["position_y_std"] > gen["position_y_std"] - 0.2 and rea["position_y_mean"] == pytest.approx(0.5, abs=0.05)
    lines = masks_markdown(comparison)
    rows = [line for line in lines if line.startswith("| scratch")]
    assert rows[0].split("|")[2].strip() == "generated" and rows[0].split("|")[3].strip() == "2"
    assert rows[1].split("|")[6].strip().startswith("1 ±")  # real: one component each
    path = save_mask_figure(comparison, tmp_path / "masks.png")
    assert Image.open(path).size[0] > 300
