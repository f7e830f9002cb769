"""Drawing images with a Stable Diffusion's parts: one pipeline builder, one scheduler switch, one `generate`.

    python -c "from defect_ds.model.sampling import load_pipeline, generate; \\
print(generate(load_pipeline('models/tiny-defect-base'), ['a photo of a pill'], resolution_px=64, steps=2, seed=0).shape)"

The training sample grid (`DefectDiffusionModel.generate`), the base model's sample grid
(`defect-ds pretrain-base`) and `defect-ds generate` build their pipelines here, as mosaicml's
model classes own `generate`; what to draw (prompts, masks, seeds) stays with each caller.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from defect_ds.model.mask_gating import mask_context

SCHEDULERS = ("ddim", "dpm++", "euler")


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline over parts already in memory (no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline  # diffusers is slow to import

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline loaded from a diffusers folder (no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_scheduler(pipe, name: str) -> None:
    """Replaces the pipeline's scheduler, keeping the model's noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = pipe.scheduler.config
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    elif name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                 solver_order=2)
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    else:
        raise ValueError(f"Unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}.")


@torch.no_grad()
def generate(pipe, prompts: list[str], *, resolution_px: int, steps: int, seed: int, guidance_scale: float = 7.5,
             masks: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, R, R) float32 images in [0, 1] on the CPU, one per prompt, all from one generator seeded with
    `seed` on the pipeline's device. masks: (N, 1, R, R) 0/1, gating the LoRA while denoising (the UNet
    must have mask gating); None leaves the UNet as it is."""
    device = next(pipe.vae.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    gate = mask_context(pipe.unet, masks.to(device)) if masks is not None else contextlib.nullcontext()
    with gate:
        images = pipe(prompts, height=resolution_px, width=resolution_px, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="pt").images
    return images.float().cpu()
