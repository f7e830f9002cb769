"""Sample-image grids during training: what the model draws for each defect token right now.

    deepspeed --num_gpus 2 train.py --config configs/default.toml --logging.sample_every_steps=50
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from defect_ds.config import LoggingConfig
from defect_ds.model.mask_gating import set_mask
from defect_ds.train.checkpoint import tag_for
from defect_ds.train.state import TrainState


class SampleGrids:
    """Renders `run_dir/samples/step-NNNNNNN.png` from the engine's module (a DefectDiffusionModel)."""

    def __init__(self, cfg: LoggingConfig, model, out_dir: Path, *, resolution_px: int, seed: int, is_main: bool):
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
        dtype = model.compute_dtype
        # frozen weights are stored in the compute dtype: the pipeline runs under the same autocast
        with torch.autocast(model.vae.device.type, dtype=dtype, enabled=dtype != torch.float32):
            render_sample_grid(model.unet, model.text_encoder, model.vae, model.tokenizer, model.noise_scheduler,
                               [model.prompt_text(p) for p in prompts], resolution_px=self.resolution_px,
                               steps=self.cfg.sample_steps, seed=self.seed, mask_gating=model.mask_gating,
                               out_path=self.path(step) if self.is_main else None)
        model.unet.train()


def sample_masks(prompts: list[str], resolution_px: int, seed: int) -> torch.Tensor:
    """(N, 1, R, R) masks, one per prompt, in the middle of the image where the objects sit: a stroke
    for prompts naming a scratch or a crack, a blob otherwise (the same every render, from `seed`)."""
    from defect_ds.data.objects import centre_region
    from defect_ds.generate.masks import random_mask

    rng = np.random.default_rng(seed)
    region = centre_region(resolution_px, resolution_px, 0.3)
    masks = [random_mask(resolution_px, resolution_px, rng, region, size_range=(0.4, 0.7),
                         kind="stroke" if ("scratch" in p or "crack" in p) else "blob") for p in prompts]
    return torch.from_numpy(np.stack(masks)[:, None]).float()


@torch.no_grad()
def render_sample_grid(unet, text_encoder, vae, tokenizer, noise_scheduler, prompts: list[str], *,
                       resolution_px: int, steps: int, seed: int, mask_gating: bool,
                       out_path: Path | None) -> torch.Tensor:
    """Renders one image per prompt with DDIM and writes a PNG row, enlarged, the mask outlined in red
    just outside it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from torchvision.utils import save_image

    was_training = unet.training
    unet.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    device = next(vae.parameters()).device
    mask = sample_masks(prompts, resolution_px, seed).to(device)
    if mask_gating:
        set_mask(unet, mask)
    generator = torch.Generator(device).manual_seed(seed)
    images = pipe(prompts, height=resolution_px, width=resolution_px, num_inference_steps=steps,
                  generator=generator, output_type="pt").images.float().cpu()
    if mask_gating:
        set_mask(unet, None)
    unet.train(was_training)
    if out_path is not None:
        from defect_ds.evaluate.report import overlay_mask

        pixels = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy()
        tiles = [overlay_mask(img, m[0].cpu().numpy()) for img, m in zip(pixels, mask)]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255, out_path, nrow=len(prompts))
    return images
