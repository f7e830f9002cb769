"""Sample-image grids during training: what the model draws for each defect token right now.

    deepspeed --num_gpus 2 train.py --config configs/default.toml --logging.sample_every_steps=50
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from defect_ds.config import LoggingConfig
from defect_ds.data.masks import overlay_mask, random_mask
from defect_ds.data.objects import centre_region
from defect_ds.model.defect_model import DefectDiffusionModel
from defect_ds.train.checkpoint import tag_for
from defect_ds.train.state import TrainState


class SampleGrids:
    """Renders `run_dir/samples/step-NNNNNNN.png` with the engine's module; an action of the loop."""

    def __init__(self, cfg: LoggingConfig, model: DefectDiffusionModel, out_dir: Path, *, resolution_px: int,
                 seed: int, is_main: bool):
        self.cfg, self.model, self.out_dir = cfg, model, out_dir
        self.resolution_px, self.seed, self.is_main = resolution_px, seed, is_main

    def path(self, step: int) -> Path:
        return self.out_dir / f"{tag_for(step)}.png"

    def due(self, step: int) -> bool:
        return bool(self.cfg.sample_every_steps) and step % self.cfg.sample_every_steps == 0

    def run(self, step: int, state: TrainState) -> None:
        """Every rank renders (ZeRO-3 gathers weights collectively); rank 0 writes the PNG."""
        model = self.model
        prompts = self.cfg.sample_prompts or [f"a photo with {t}" for t in model.tokens] or ["a photo of a defect"]
        masks = sample_masks(prompts, self.resolution_px, self.seed)
        images = model.generate(prompts, resolution_px=self.resolution_px, steps=self.cfg.sample_steps,
                                seed=self.seed, masks=masks)
        # the UNet leaves the grid in train mode even when it came in eval mode (as diffusers loads it)
        model.unet.train()
        if self.is_main:
            save_grid(images, masks, self.path(step))


def sample_masks(prompts: list[str], resolution_px: int, seed: int) -> torch.Tensor:
    """(N, 1, R, R) masks, one per prompt, in the middle of the image where the objects sit: a stroke
    for prompts naming a scratch or a crack, a blob otherwise (the same every render, from `seed`)."""
    rng = np.random.default_rng(seed)
    region = centre_region(resolution_px, resolution_px, 0.3)
    masks = [random_mask(resolution_px, resolution_px, rng, region, size_range=(0.4, 0.7),
                         kind="stroke" if ("scratch" in p or "crack" in p) else "blob") for p in prompts]
    return torch.from_numpy(np.stack(masks)[:, None]).float()


def save_grid(images: torch.Tensor, masks: torch.Tensor, out_path: Path) -> None:
    """One PNG row of the images (N, 3, R, R in [0, 1]), enlarged, each mask outlined in red just outside it."""
    pixels = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy()
    tiles = [overlay_mask(img, m[0].cpu().numpy()) for img, m in zip(pixels, masks)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255, out_path, nrow=len(images))
