"""Augmented real masks: rotated, scaled, flipped and deformed copies of the shots' masks, placed on
the object, exactly 0/1, seeded and recorded; a defect type without masks is named."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from defect_ds.data.objects import object_region
from defect_ds.data.masks import augment_mask, place_on_object
from defect_ds.generate.spec import GenerationSettings, plan_samples


def _object_image(size: int = 64, radius: float = 0.35) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * radius) ** 2
    image = np.full((size, size, 3), 20, np.uint8)
    image[disc] = 180
    return image


def _scratch() -> np.ndarray:
    m = np.zeros((64, 64), np.uint8)
    m[30:32, 8:40] = 1  # 2 x 32: long and thin, so rotation shows
    return m


def _crop(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_augmented_masks_are_binary_on_the_object_seeded_and_recorded():
    source = _object_image()
    region = object_region(source)
    pool = {"scratch": [(_scratch(), "shots:s0", "pill")]}
    settings = GenerationSettings(mode="inpaint", mask_source="augmented")
    plan = lambda: plan_samples({"scratch": "sks_scratch"}, ["scratch"], 8, settings, mask_pool=pool,
                                sources=[(source, "good0", "pill")])
    specs, again = plan(), plan()
    for spec, same in zip(specs, again):
        m = spec.mask
        assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
        assert not (m.astype(bool) & ~region).any()  # never off the object
        assert 0.4 < m.sum() / _scratch().sum() < 2.5  # the real defect's size, give or take the scale
        assert np.array_equal(m, same.mask) and spec.extra == same.extra  # seeded by the sample key
        aug = spec.extra["mask_augmentation"]
        assert {"angle_deg", "scale", "hflip", "vflip", "elastic_seed", "elastic_alpha"} <= set(aug)
        assert spec.mask_origin == "augmented:shots:s0"
        top, left = spec.extra["mask_placement"]["offset_yx"]
        assert m[top:, left:].sum() == m.sum()  # the recorded offset is where the shape starts
    assert len({s.mask.tobytes() for s in specs}) == 8
    # rotated: a horizontal 2 x 32 scratch is no longer always wide and flat
    shapes = [_crop(s.mask).shape for s in specs]
    assert any(h > w for h, w in shapes)


def test_augment_mask_deforms_and_place_shrinks_to_fit_a_small_object():
    rng = np.random.default_rng(0)
    blob = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    blob[(yy - 30) ** 2 + (xx - 30) ** 2 < 100] = 1
    shape, params = augment_mask(blob, rng)
    assert set(np.unique(shape)) == {0, 1} and shape[0].any() and shape[:, 0].any()  # cropped to the defect
    # a disc is the same under rotation and flips: what differs is the scale and the elastic deformation
    disc = _crop(blob)
    assert shape.shape != disc.shape or not np.array_equal(shape, disc)
    region = np.zeros((64, 64), bool)
    region[40:46, 10:18] = True  # smaller than the blob
    placed, where = place_on_object(shape, region, rng)
    assert placed.any() and not (placed.astype(bool) & ~region).any() and where["placed_scale"] < 1


def test_augmented_names_a_defect_type_without_masks():
    pool = {"stain": [(_scratch(), "shots:s0", "pill")]}
    with pytest.raises(ValueError, match=r"Augmented masks.*'scratch'.*stain") as e:
        plan_samples({"scratch": "sks_scratch", "stain": "sks_stain"}, ["stain", "scratch"], 1,
                     GenerationSettings(mask_source="augmented"), mask_pool=pool, sources=[])
    assert "\n" not in str(e.value)


def test_latent_cells_survive_the_inpainting_pipelines_mask_shrink():
    import torch.nn.functional as F

    from defect_ds.generate.pipeline import latent_cells

    mask = np.zeros((16, 16), np.uint8)
    mask[5, 2:14] = 1  # a 1-px scratch on an odd row
    nearest = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(8, 8))  # what diffusers does
    assert nearest.sum() == 0  # the scratch would vanish from the latent mask
    cells = latent_cells(mask, 2)
    shrunk = F.interpolate(torch.from_numpy(cells).float()[None, None], size=(8, 8))[0, 0]
    assert torch.equal(shrunk, F.max_pool2d(torch.from_numpy(mask).float()[None, None], 2)[0, 0])
    assert cells[mask.astype(bool)].all() and cells.sum() == 2 * 2 * 6  # whole cells, no more
