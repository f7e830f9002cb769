"""Diffusion training maths as pure functions over tensors: noise, timesteps, targets, weights, loss.

    python -m pytest tests/unit/model/test_objective.py -q
"""
from __future__ import annotations

import torch

from defect_ds.config import LossConfig
from defect_ds.model.mask_gating import resize_mask


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise; with an offset, plus a per-channel constant so the model learns dark/bright images."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset > 0:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                             device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device).long()


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def prediction_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """epsilon: the noise; v_prediction: v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(latents.dtype)
    raise ValueError(f"Unknown prediction type {prediction_type!r}: use epsilon or v_prediction.")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (Hang et al. 2023), for the given prediction target."""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The pixel mask at the latent grid, still exactly 0/1: a latent pixel is defect when any pixel
    of its 8x8 patch is, so a scratch thinner than a patch still weighs as defect in the loss."""
    return resize_mask(mask, latent_hw, "max")


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cfg: LossConfig,
                          sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mask-weighted MSE, one scalar for the batch.

    mask: (B, 1, h, w) at latent resolution. Area-normalised: each sample's loss is the weighted mean
    of its defect-area mean error and its background-area mean error, using only the areas present
    (a defect-free sample is all background). Otherwise: the plain weighted pixel mean.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)  # (B, 1, h, w)
    mask = mask.float()
    if cfg.area_normalised:
        dims = (1, 2, 3)
        defect_area = mask.sum(dims)
        background_area = (1 - mask).sum(dims)
        defect_mean = (err * mask).sum(dims) / defect_area.clamp(min=1)
        background_mean = (err * (1 - mask)).sum(dims) / background_area.clamp(min=1)
        wd = cfg.defect_weight * (defect_area > 0).float()
        wb = cfg.background_weight * (background_area > 0).float()
        per_sample = (wd * defect_mean + wb * background_mean) / (wd + wb).clamp(min=1e-12)
    else:
        weights = cfg.defect_weight * mask + cfg.background_weight * (1 - mask)
        per_sample = (err * weights).mean(dim=(1, 2, 3))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()


def unmask_some(mask: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """The batch's (B, 1, H, W) masks with each sample's replaced by all ones with `probability`
    (loss.unmasked_probability). Draws from `generator` only when probability > 0, so runs without
    the option keep their noise and timesteps."""
    if probability <= 0:
        return mask
    draw = torch.rand((mask.shape[0],), generator=generator, device=generator.device).to(mask.device)
    full = (draw < probability).view(-1, 1, 1, 1)
    return torch.where(full, torch.ones_like(mask), mask)


def prior_preservation_loss(pred: torch.Tensor, base_pred: torch.Tensor, mask: torch.Tensor,
                            sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of each sample's background-area mean squared distance to the base model's
    prediction: outside the mask the fine-tuned model is pulled to what the base model does there.

    mask: (B, 1, h, w) 0/1 at latent resolution; a sample with no background adds 0."""
    err = (pred.float() - base_pred.float()).pow(2).mean(dim=1, keepdim=True)
    background = 1 - mask.float()
    per_sample = (err * background).sum((1, 2, 3)) / background.sum((1, 2, 3)).clamp(min=1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()
