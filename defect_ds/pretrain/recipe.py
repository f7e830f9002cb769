"""The recipe of a small base model (architecture and training settings, written beside the weights), and
`defect-ds pretrain-base`'s config: [recipe] and [run], read by `defect_ds.config.load_config`.

    python -c "from defect_ds.pretrain.recipe import BaseRecipe; print(BaseRecipe())"
    python -c "from defect_ds.pretrain.recipe import PretrainConfig; print(PretrainConfig())"

The same recipe and data reproduce the same base: every random draw is a function of (seed, stage, step).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from defect_ds.config import read_config_file, require

RECORDS = ("data", "resolution_px", "vae_from")  # what OUT/recipe.json adds to the recipe, so that file is a recipe too


@dataclass
class BaseRecipe:
    seed: int = 0
    # VAE: f2 (one downsampling), so a 64 px image has a 32x32x4 latent (3x compression); an f4 codec of
    # this size (16x16x4, 12x) erased every 1-px scratch (benchmarks/results/base-model-*.md). Four latent
    # channels because diffusers' inpainting pipeline takes no other count (8 kept more thin strokes in a
    # 300-step trial: benchmarks/results/codec-trials-2026-11-29-300-steps.md). Trained as a generic
    # codec (see stages.add_strokes).
    vae_channels: tuple[int, ...] = (32, 64)
    vae_latent_channels: int = 4
    vae_steps: int = 1200
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6  # SD's VAE weight: a near-deterministic codec, latents kept near N(0, s^2)
    # Starting log-variance of the posterior. diffusers starts it near 0 (std ~1), and in a short CPU run the
    # KL-weighted codec never brings it down: at std ~0.5 against latents of std ~0.7, the sampling noise
    # drowned every 1-px stroke, so the decoder learned to ignore them. -8 starts at std 0.02.
    vae_logvar_init: float = -8.0
    vae_stroke_probability: float = 0.75  # share of VAE training images given random thin strokes and dots
    vae_stroke_weight: float = 10.0  # extra loss weight of a stroke pixel (a good pixel weighs 1)
    # UNet + text encoder: SD's block types at a fraction of the width; cross-attention (and so the mask
    # gate) at the levels marked True: the 16x16 and 8x8 grids of a 64 px image, none at the 32x32 latent.
    unet_channels: tuple[int, ...] = (32, 64, 128, 128)
    unet_attention: tuple[bool, ...] = (False, True, True, False)
    unet_layers_per_block: int = 1
    text_hidden_size: int = 64
    text_layers: int = 2
    unet_steps: int = 1500
    unet_batch_size: int = 32
    unet_learning_rate: float = 5e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # empty captions now and then, so classifier-free guidance works
    ema_decay: float = 0.999
    val_every_steps: int = 250
    save_every_steps: int = 250
    # autocast of the training forward passes (weights and optimizer stay fp32); auto is bf16 on CPUs with
    # native bf16 (avx512_bf16, AMX) and fp32 elsewhere, where bf16 is emulated: 25x slower than fp32 on an
    # AVX2-only EPYC here. The run records what auto resolved to.
    precision: str = "auto"
    extra: dict = field(default_factory=dict)  # free-form notes carried into recipe.json

    def validate(self) -> None:
        for f in ("vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size", "val_every_steps",
                  "save_every_steps"):
            if getattr(self, f) < 1:
                raise ValueError(f"Recipe field {f}={getattr(self, f)} must be at least 1.")
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(f"Recipe fields unet_attention and unet_channels must have the same length, got "
                             f"{len(self.unet_attention)} and {len(self.unet_channels)}.")
        if self.vae_latent_channels != 4:
            raise ValueError(f"Recipe field vae_latent_channels={self.vae_latent_channels} must be 4: diffusers' "
                             "inpainting pipeline (generation's inpaint mode) takes 4-channel latents only.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"Recipe field precision={self.precision!r} must be auto, fp32 or bf16.")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"Recipe field caption_dropout={self.caption_dropout} must be in [0, 1).")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)



def read_recipe(path: str | Path) -> dict[str, Any]:
    """The fields of a recipe JSON (`--recipe`), such as a finished base's recipe.json less its records."""
    return {k: v for k, v in read_config_file(path).items() if k not in RECORDS}


@dataclass
class RunOptions:
    """How one run goes, beside the recipe: what it reads, saves and shows."""
    resolution_px: int = 0  # resize images to this side; 0: as stored
    threads: int = 0  # torch CPU threads; 0: torch's choice
    save_fp16: bool = True  # store the UNet and VAE in fp16 (half the size); the text encoder is always fp32
    sample_steps: int = 30  # denoising steps of the sample grid
    keep_state: bool = False  # keep OUT/train_state/ after finishing
    progress: bool = True  # progress bars
    # a finished base whose codec (its vae/) is reused instead of training one: a change to the UNet is then
    # compared on the same latents, and the shots' encoded latents stay valid (recorded in OUT/recipe.json)
    vae_from: str = ""

    def validate(self) -> None:
        require(self.resolution_px >= 0, "run.resolution_px", self.resolution_px, "use 0 (as stored) or a side")
        require(self.threads >= 0, "run.threads", self.threads, "use 0 (torch's choice) or more")
        require(self.sample_steps >= 1, "run.sample_steps", self.sample_steps, "use 1 or more")


@dataclass
class PretrainConfig:
    recipe: BaseRecipe = field(default_factory=BaseRecipe)
    run: RunOptions = field(default_factory=RunOptions)

    def validate(self) -> None:
        self.recipe.validate()
        self.run.validate()
