"""The masks of the training sample grid: one per prompt, on the middle of the image, the same every render."""
from __future__ import annotations

import torch

from defect_ds.train.sample_grid import sample_masks


def test_one_mask_per_prompt_in_the_middle_and_the_same_every_render():
    prompts = ["a photo of a pill with a sks_spot", "a photo of a screw head with a sks_scratch"]
    masks = sample_masks(prompts, 64, seed=3)
    assert masks.shape == (2, 1, 64, 64)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert all(m.sum() >= 4 for m in masks)
    ys, xs = torch.nonzero(masks.amax(0)[0], as_tuple=True)
    assert ys.min() >= 19 and ys.max() <= 44 and xs.min() >= 19 and xs.max() <= 44  # 30% margin
    assert torch.equal(masks, sample_masks(prompts, 64, seed=3))
    assert not torch.equal(masks, sample_masks(prompts, 64, seed=4))


def test_a_scratch_gets_a_thin_stroke_and_a_spot_a_blob():
    spot, scratch = sample_masks(["a sks_spot", "a sks_scratch"], 64, seed=0)[:, 0]
    # a stroke is long and thin: its area is small against its bounding box
    def fill(m):
        ys, xs = torch.nonzero(m, as_tuple=True)
        return m.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
    assert fill(scratch) < fill(spot)


def test_grid_is_one_row_of_enlarged_tiles_with_the_mask_outlined(tmp_path):
    from PIL import Image

    from defect_ds.train.sample_grid import save_grid

    images = torch.full((3, 3, 32, 32), 0.5)
    masks = sample_masks(["a sks_spot", "a sks_scratch", "a sks_spot"], 32, seed=0)
    save_grid(images, masks, tmp_path / "grid" / "step-0000001.png")
    grid = Image.open(tmp_path / "grid" / "step-0000001.png").convert("RGB")
    assert grid.width > 3 * 128 > grid.height >= 128  # 32 px enlarged 4 times, side by side
    assert (255, 40, 40) in {c for _, c in grid.getcolors(1 << 16)}  # the red outline
