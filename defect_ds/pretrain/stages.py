"""The two stages of a base model trained from scratch: an image codec (VAE), then a text-to-latent UNet.

Each stage is a plain loop over in-memory tensors (the base data sets are small and at demo
resolution): every random draw of step s comes from a generator seeded by (seed, stage, s), so a
resumed stage draws exactly what an uninterrupted one would. State is saved as plain tensors and
numbers and read back with `weights_only=True`.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from defect_ds.model import objective
from defect_ds.pretrain.recipe import BaseRecipe
from defect_ds.utils.files import disk_full_as_sentence

VAE_STAGE, UNET_STAGE, VAL_STAGE = 1, 2, 3


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stage) * 10_000_019 + step)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def save_state(path: Path, state: dict) -> None:
    """Write-then-rename: a kill mid-save leaves the previous state intact."""
    tmp = path.with_suffix(".tmp")
    with disk_full_as_sentence(path, "free space and rerun the same command to resume"):
        torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None


# ---- stage 1: the VAE ------------------------------------------------------------------------------
def build_vae(recipe: BaseRecipe, resolution_px: int):
    from diffusers import AutoencoderKL

    n = len(recipe.vae_channels)
    vae = AutoencoderKL(
        sample_size=resolution_px, in_channels=3, out_channels=3, latent_channels=recipe.vae_latent_channels,
        layers_per_block=1, block_out_channels=tuple(recipe.vae_channels), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        scaling_factor=1.0)
    with torch.no_grad():  # quant_conv's output is (mean, logvar) along channels
        vae.quant_conv.bias[recipe.vae_latent_channels:] = recipe.vae_logvar_init
    return vae


def add_strokes(images: torch.Tensor, rng: np.random.Generator, probability: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random thin lines and dots of random colours on some images (uint8 N,3,H,W); returns them and
    where strokes were drawn (bool N,1,H,W).

    Generic detail, not the defect types: a codec trained on smooth good parts alone learns to blur
    1-px structure away, and then no defect could ever be drawn thin enough."""
    out = images.clone()
    drawn = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    size = images.shape[-1]
    for i in range(images.shape[0]):
        if rng.random() >= probability:
            continue
        canvas = Image.fromarray(out[i].permute(1, 2, 0).numpy())
        where = Image.new("L", canvas.size, 0)
        draws = ImageDraw.Draw(canvas), ImageDraw.Draw(where)
        for _ in range(int(rng.integers(1, 5))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.6:
                points = [tuple(rng.uniform(0, size, 2)) for _ in range(int(rng.integers(2, 5)))]
                width = int(rng.integers(1, 3))
                for draw, fill in zip(draws, (colour, 255)):
                    draw.line(points, fill=fill, width=width)
            else:
                cx, cy, r = *rng.uniform(0, size, 2), rng.uniform(1, size / 10)
                for draw, fill in zip(draws, (colour, 255)):
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        out[i] = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
        drawn[i, 0] = torch.from_numpy(np.asarray(where) > 0)
    return out, drawn


def train_vae(images: torch.Tensor, recipe: BaseRecipe, state_path: Path,
              on_step: Callable[[int, dict], None]):
    """Trains the codec on uint8 images (N, 3, H, W); returns it with `scaling_factor` still 1."""
    torch.manual_seed(recipe.seed)
    vae = build_vae(recipe, images.shape[-1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    start = 0
    if (state := load_state(state_path)) is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    vae.train()
    for step in range(start, recipe.vae_steps):
        gen = step_generator(recipe.seed, VAE_STAGE, step)
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        batch = images[torch.randint(len(images), (recipe.vae_batch_size,), generator=gen)]
        batch, strokes = add_strokes(batch, rng, recipe.vae_stroke_probability)
        x = to_unit(batch)
        # thin strokes are a few pixels of each image: weighted up, so the loss does not let them blur
        weight = 1.0 + recipe.vae_stroke_weight * strokes.float()
        if rng.random() < 0.5:
            x, weight = x.flip(-1), weight.flip(-1)
        lr = recipe.vae_learning_rate * 0.5 * (1 + math.cos(math.pi * step / recipe.vae_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(recipe.precision):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample
        recon = recon.float()
        kl = posterior.kl().float().mean()
        err = (recon - x).abs()
        loss = ((err + err.square()) * weight).mean() / weight.mean() + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % recipe.save_every_steps == 0 or done == recipe.vae_steps:
            save_state(state_path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": done})
        on_step(done, {"loss": loss.item(), "lr": lr})
    vae.eval()
    return vae


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the latent distribution of uint8 images, fp32."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(to_unit(images[i:i + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 round trip through the codec (latent mean, no sampling)."""
    out = []
    for i in range(0, len(images), batch_size):
        recon = vae.decode(vae.encode(to_unit(images[i:i + batch_size])).latent_dist.mean).sample
        out.append(((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


# ---- stage 2: the UNet and the text encoder --------------------------------------------------------
def build_unet(recipe: BaseRecipe, latent_size: int, latent_channels: int):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in recipe.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.unet_attention))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=recipe.unet_layers_per_block, block_out_channels=tuple(recipe.unet_channels),
        cross_attention_dim=recipe.text_hidden_size, attention_head_dim=8, norm_num_groups=32,
        down_block_types=down, up_block_types=up)


def build_text_encoder(recipe: BaseRecipe, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden_size,
        intermediate_size=2 * recipe.text_hidden_size, num_attention_heads=4,
        num_hidden_layers=recipe.text_layers, max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu", projection_dim=recipe.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


class LatentSet:
    """Latent distributions of a split, both orientations, with each image's caption ids."""

    def __init__(self, vae, images: torch.Tensor, ids: torch.Tensor, scaling_factor: float):
        both = torch.cat([images, images.flip(-1)])
        self.mean, self.std = encode(vae, both)
        self.ids = torch.cat([ids, ids])
        self.scaling_factor = scaling_factor

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.mean[index].shape, generator=gen)
        return (self.mean[index] + self.std[index] * eps) * self.scaling_factor


def diffusion_loss(unet, text_encoder, latents: torch.Tensor, ids: torch.Tensor, scheduler,
                   gen: torch.Generator, precision: str) -> torch.Tensor:
    # noise, timesteps and noising as fine-tuning draws them (model/objective.py)
    noise = objective.sample_noise(latents, 0.0, gen)
    timesteps = objective.sample_timesteps(len(latents), scheduler.config.num_train_timesteps, gen, latents.device)
    noisy = objective.add_noise(latents, noise, timesteps, scheduler.alphas_cumprod)
    with autocast(precision):
        text = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, text).sample
    return F.mse_loss(pred.float(), noise)


def train_unet(train: LatentSet, val: LatentSet, empty_ids: torch.Tensor, unet, text_encoder, scheduler,
               recipe: BaseRecipe, state_path: Path, on_step: Callable[[int, dict], None]):
    """Trains the UNet and the text encoder on good images' latents; returns the EMA weights loaded."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.unet_steps)
    ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True)
    start = 0
    if (state := load_state(state_path)) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        start = int(state["step"])
    unet.train()
    text_encoder.train()
    for step in range(start, recipe.unet_steps):
        gen = step_generator(recipe.seed, UNET_STAGE, step)
        index = torch.randint(len(train), (recipe.unet_batch_size,), generator=gen)
        ids = train.ids[index].clone()
        ids[torch.rand(len(index), generator=gen) < recipe.caption_dropout] = empty_ids
        loss = diffusion_loss(unet, text_encoder, train.sample(index, gen), ids, scheduler, gen,
                              recipe.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        done = step + 1
        values = {"loss": loss.item(), "lr": schedule.get_last_lr()[0]}
        if done % recipe.val_every_steps == 0 or done == recipe.unet_steps:
            ema.store(params)
            ema.copy_to(params)
            values["val_loss_ema"] = validation_loss(unet, text_encoder, val, scheduler, recipe)
            ema.restore(params)
            unet.train()
            text_encoder.train()
        if done % recipe.save_every_steps == 0 or done == recipe.unet_steps:
            save_state(state_path, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                    "ema": ema.state_dict(), "step": done})
        on_step(done, values)
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


@torch.no_grad()
def validation_loss(unet, text_encoder, val: LatentSet, scheduler, recipe: BaseRecipe,
                    repeats: int = 4) -> float:
    """Noise-prediction loss on held-out good images, with the same noise and timesteps every time."""
    unet.eval()
    text_encoder.eval()
    total, count = 0.0, 0
    for r in range(repeats):
        gen = step_generator(recipe.seed, VAL_STAGE, r)
        for i in range(0, len(val), 64):
            index = torch.arange(i, min(i + 64, len(val)))
            loss = diffusion_loss(unet, text_encoder, val.sample(index, gen), val.ids[index], scheduler, gen,
                                  recipe.precision)
            total += loss.item() * len(index)
            count += len(index)
    return total / max(count, 1)


def elapsed_since(start: float) -> float:
    return round(time.perf_counter() - start, 1)
