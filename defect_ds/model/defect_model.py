"""The model a run trains, built from its config sections, and the diffusion loss of one batch.

    python -c "from defect_ds.config import RunConfig as R; from defect_ds.model.defect_model import build_model; \\
c = R(); c.model.pretrained_dir = 'models/tiny-defect-base'; \\
print(build_model(c.model, c.lora, c.textual_inversion, c.loss, tokens=[]).mask_gating)"

`DefectDiffusionModel` is what the DeepSpeed engine wraps: the UNet (with LoRA) and the text encoder
(with learned tokens). Its `loss` holds the whole objective, as the model classes of
mosaicml/diffusion do: VAE encoding (or stored latents), noise, timesteps, target, mask-weighted loss.
The trainer calls it, then runs backward and the optimizer step. Its `generate` draws images with the
weights as they are (the training sample grid).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from defect_ds.config import LoraConfig, LossConfig, ModelConfig, TextualInversionConfig
from defect_ds.model import objective
from defect_ds.model.components import add_lora, load_components, set_trainable, tokenize
from defect_ds.model.mask_gating import enable_mask_gating, set_mask
from defect_ds.model.sampling import assemble_pipeline, generate
from defect_ds.model.textual_inversion import add_tokens, expand_prompt


class DefectDiffusionModel(nn.Module):
    """The UNet and the text encoder as modules; the frozen VAE, tokenizer and noise schedule beside them.

    Only the UNet and the text encoder are submodules: they are what the engine checkpoints and, under
    ZeRO-3, partitions. The VAE is kept out of the module tree on purpose (the checkpoint format holds
    no VAE weights).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, *, vae: nn.Module, tokenizer, noise_scheduler,
                 loss_cfg: LossConfig, tokens: list[str], vectors_per_token: int, mask_gating: bool,
                 compute_dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        object.__setattr__(self, "vae", vae)  # not a submodule, see the class docstring
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.loss_cfg = loss_cfg
        self.tokens = tokens
        self.vectors_per_token = vectors_per_token
        self._token_cache: dict[str, torch.Tensor] = {}  # caption -> ids; the tokenizer is fixed from here on
        self.mask_gating = mask_gating
        self.compute_dtype = compute_dtype
        self.autocast_dtype = compute_dtype if compute_dtype != torch.float32 else None
        self.channels_last = channels_last
        self.text_trains = any(p.requires_grad for p in text_encoder.parameters())
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(next(vae.parameters()).device)
        self.prediction_type = (noise_scheduler.config.prediction_type if loss_cfg.prediction_type == "scheduler"
                                else loss_cfg.prediction_type)

    def use_channels_last(self) -> None:
        """NHWC weights for the UNet's frozen convolutions. Trained weights keep their storage: under ZeRO
        they are views into the optimizer's flat buffer, and a copy would stop receiving its updates."""
        for p in self.unet.parameters():
            if p.dim() == 4 and not p.requires_grad:
                p.data = p.data.contiguous(memory_format=torch.channels_last)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor,
                mask: torch.Tensor, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction. text_embeds: precomputed encoder states (latent shards, frozen text
        encoder) skip the encoder."""
        device_type = noisy_latents.device.type
        autocast = (torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            if text_embeds is not None and not self.text_trains:
                text = text_embeds
            else:
                with torch.set_grad_enabled(self.text_trains and torch.is_grad_enabled()):
                    text = self.text_encoder(input_ids)[0]
            if self.mask_gating:
                # stays set through backward: checkpointed blocks recompute with the same mask
                set_mask(self.unet, mask)
            return self.unet(noisy_latents, timesteps, text).sample

    def loss(self, batch: dict, generator: torch.Generator,
             denoise: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """The mask-weighted diffusion loss of one batch, a scalar with its graph.

        Noise, timesteps and the VAE sample are drawn from `generator` only, so a step is a function of
        its seed. `denoise` runs the forward pass: the DeepSpeed engine that wraps this model (default:
        the model itself)."""
        device = self.alphas_cumprod.device
        mask = batch["mask"].to(device, non_blocking=True)
        latents = self.encode(batch, generator)
        noise = objective.sample_noise(latents, self.loss_cfg.noise_offset, generator)
        timesteps = objective.sample_timesteps(latents.shape[0], len(self.alphas_cumprod), generator, device)
        mask = objective.unmask_some(mask, self.loss_cfg.unmasked_probability, generator)
        noisy = objective.add_noise(latents, noise, timesteps, self.alphas_cumprod)
        target = objective.prediction_target(self.prediction_type, latents, noise, timesteps, self.alphas_cumprod)
        input_ids = self.token_ids(batch["caption"]).to(device)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        text_embeds = batch.get("text_embeds")
        if text_embeds is not None:
            text_embeds = text_embeds.to(device, non_blocking=True)
        forward = self if denoise is None else denoise  # not `or`: a compiled module has no truth value
        prior_weight = self.loss_cfg.prior_preservation_weight
        base_pred = None
        if prior_weight > 0:
            if not self.mask_gating:
                raise ValueError("loss.prior_preservation_weight needs mask-gated LoRA (the base model's "
                                 "prediction is a zero-mask forward); set it to 0 or enable lora.mask_gating.")
            # before the real forward: the mask stays set through backward, where checkpointed blocks
            # recompute with it, so the last one set must be the batch's own
            with torch.no_grad():
                base_pred = forward(noisy, timesteps, input_ids, torch.zeros_like(mask), text_embeds)
        pred = forward(noisy, timesteps, input_ids, mask, text_embeds)
        weights = None
        if self.loss_cfg.min_snr_gamma > 0:
            weights = objective.min_snr_weights(timesteps, self.alphas_cumprod, self.loss_cfg.min_snr_gamma,
                                                self.prediction_type)
        small_mask = objective.latent_mask(mask, latents.shape[-2:])
        loss = objective.masked_diffusion_loss(pred, target, small_mask, self.loss_cfg, weights)
        if base_pred is not None:
            loss = loss + prior_weight * objective.prior_preservation_loss(pred, base_pred, small_mask, weights)
        return loss

    @torch.no_grad()
    def encode(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled fp32 latents of the batch: stored ones (latent shards) or the VAE's sample of the pixels."""
        device, scale = self.alphas_cumprod.device, self.vae.config.scaling_factor
        if "latents" in batch:
            return (batch["latents"].to(device, non_blocking=True) * scale).float()
        pixels = batch["pixel_values"].to(device, self.compute_dtype, non_blocking=True)
        return self.vae.encode(pixels).latent_dist.sample(generator=generator).float() * scale

    @torch.no_grad()
    def generate(self, prompts: list[str], *, resolution_px: int, steps: int, seed: int,
                 masks: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, R, R) float32 images in [0, 1] on the CPU, one per prompt, drawn with DDIM from the weights
        as they are now; learned tokens in the prompts are spelled out here. masks (N, 1, R, R) gate the
        LoRA when mask gating is on. Under ZeRO-3 every rank must call it (weights are gathered collectively)."""
        from diffusers import DDIMScheduler  # diffusers is slow to import

        was_training = self.unet.training
        self.unet.eval()
        pipe = assemble_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet,
                                 DDIMScheduler.from_config(self.noise_scheduler.config))
        dtype = self.compute_dtype
        # frozen weights are stored in the compute dtype: the pipeline runs under the same autocast
        with torch.autocast(self.vae.device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = generate(pipe, [self.prompt_text(p) for p in prompts], resolution_px=resolution_px,
                              steps=steps, seed=seed, masks=masks if self.mask_gating else None)
        self.unet.train(was_training)
        return images

    def prompt_text(self, prompt: str) -> str:
        """The prompt with every multi-vector token spelled out, as the tokenizer must see it."""
        return expand_prompt(prompt, self.tokens, self.vectors_per_token)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """(B, 77) token ids; each distinct caption is tokenised once per run (a data set has few distinct
        captions, and the tokenizer's Python was a few ms of every step)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._token_cache))
        if missing:
            ids = tokenize(self.tokenizer, [self.prompt_text(c) for c in missing])
            self._token_cache.update(zip(missing, ids))
        return torch.stack([self._token_cache[c] for c in captions])


def build_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, ti_cfg: TextualInversionConfig,
                loss_cfg: LossConfig, *, tokens: list[str], compute_dtype: torch.dtype = torch.float32,
                device: torch.device = torch.device("cpu"), defer_layout: bool = False,
                zero3_config: dict | None = None) -> DefectDiffusionModel:
    """The trainable model: LoRA adapters, learned tokens, what trains, frozen weights in the compute dtype,
    mask gating. Seed torch first: new adapter weights are drawn here (the same on every rank).
    defer_layout: leave the UNet contiguous; the caller calls `use_channels_last()` later (DeepSpeed's
    CPU broadcast at initialisation cannot send bf16 weights in channels_last).
    zero3_config: the run's ZeRO-3 DeepSpeed config: the UNet's weights are partitioned as they load, in
    the dtype DeepSpeed keeps them in (the engine would cast them to it too)."""
    parts = load_components(model_cfg, zero3_config)
    unet, text_encoder, vae = parts.unet, parts.text_encoder, parts.vae
    if model_cfg.unet_mode == "lora":
        add_lora(unet, lora_cfg)
    if tokens:
        add_tokens(parts.tokenizer, text_encoder, tokens, ti_cfg.vectors_per_token, ti_cfg.initializer_word)
    set_trainable(unet, text_encoder, model_cfg.unet_mode)
    if model_cfg.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    for module in (unet, text_encoder, vae):  # frozen weights in the compute dtype
        for p in module.parameters():
            if not p.requires_grad and not hasattr(p, "ds_id"):  # a partitioned weight keeps DeepSpeed's dtype
                p.data = p.data.to(compute_dtype)
    channels_last = model_cfg.channels_last
    vae.to(device).eval()
    mask_gating = model_cfg.unet_mode == "lora" and lora_cfg.mask_gating
    if mask_gating:
        enable_mask_gating(unet, lora_cfg.mask_resize)
    model = DefectDiffusionModel(unet, text_encoder, vae=vae, tokenizer=parts.tokenizer,
                                 noise_scheduler=parts.noise_scheduler, loss_cfg=loss_cfg, tokens=tokens,
                                 vectors_per_token=ti_cfg.vectors_per_token, mask_gating=mask_gating,
                                 compute_dtype=compute_dtype, channels_last=channels_last)
    if channels_last and not defer_layout:
        model.use_channels_last()
    return model
