"""FLOPs per training sample, measured once per run from the real model on the meta device.

    python -c "from defect_ds.perf.flops import measure_sd15; print(measure_sd15(512))"

Each part is counted on its own by `torch.utils.flop_counter.FlopCounterMode` while the model runs on
the meta device (shapes only: SD 1.5 costs no memory and about ten seconds of CPU). The counter sees
matrix multiplies, convolutions and attention; norms, activations and the mask gating are
elementwise and left out, as every MFU convention does.

- `unet_forward`: one UNet forward pass.
- `unet_backward`: the backward actually performed. The counter sees only the gradients autograd
  computes: with LoRA the frozen weights get no weight gradients, so the backward is input
  gradients plus the small adapter weight gradients (about 1.1x the forward for SD 1.5, not the 2x
  of full training). With a frozen UNet and textual inversion it is the input gradients back to
  the text embeddings; with nothing trainable it is 0.
- `recompute`: activation checkpointing re-runs the forward of every checkpointed block whose
  saved activations the backward needs. It is measured, not estimated: the backward is counted
  once without and once with `enable_gradient_checkpointing()` and the difference is the recompute.
  (Blocks with nothing trainable above them are never recomputed, which a "one extra forward" rule
  would miss.) It counts in hardware FLOPs (HFU), not in model FLOPs (MFU).
- `vae_encode`: the VAE encoder, when images are encoded every step (0 with precomputed latents).
- `text_encoder`, `text_encoder_backward`: the CLIP text encoder forward (0 when text embeddings are
  precomputed) and, with textual inversion, its backward to the learned token vectors.

Counting takes seconds even for the tiny model (the counter sees every op in Python), and every rank of
every launch needs the same numbers: `cached_measure_flops` keeps each count in the user's cache
(`~/.cache/defect-ds/flops`, or under `$XDG_CACHE_HOME`), named by a hash of the arguments, torch's
version and this file, so a changed model, set-up or counting rule is counted anew.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from defect_ds.config import LoraConfig
from defect_ds.model.components import UNET_MODES, add_lora, set_unet_trainable
from defect_ds.model.tiny import SD15_TEXT, SD15_UNET, SD15_VAE
from defect_ds.utils.files import atomic_write_json

TEXT_SEQUENCE_LENGTH = 77  # CLIP's context: prompts are padded to it


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs per training sample (one image), each part on its own."""

    unet_forward: int
    unet_backward: int
    recompute: int
    vae_encode: int
    text_encoder: int
    text_encoder_backward: int = 0

    @property
    def model_flops(self) -> int:
        """What MFU counts: the work the step needs, recompute excluded."""
        return (self.unet_forward + self.unet_backward + self.vae_encode + self.text_encoder
                + self.text_encoder_backward)

    @property
    def hardware_flops(self) -> int:
        """What HFU counts: model FLOPs plus the activation-checkpoint recompute."""
        return self.model_flops + self.recompute

    def to_dict(self) -> dict[str, int]:
        return dict(dataclasses.asdict(self), model_flops=self.model_flops, hardware_flops=self.hardware_flops)

    def __str__(self) -> str:
        return ", ".join(f"{k}={v / 1e12:.3f} TFLOP" for k, v in self.to_dict().items())


def measure_flops(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], text_config: Any, *,
                  resolution_px: int, unet_mode: str = "lora", lora_rank: int = 8,
                  lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                  activation_checkpointing: bool = False, train_text_embeddings: bool = False,
                  latents_precomputed: bool = False, text_embeddings_precomputed: bool = False,
                  batch_size: int = 1) -> FlopBreakdown:
    """Counts the FLOPs of one training sample of this model and set-up (see the module docstring).

    The configs are constructor kwargs or saved `config.json` contents (keys starting with `_` are
    ignored); `text_config` may also be a `transformers.CLIPTextConfig`.
    """
    if unet_mode not in UNET_MODES:
        raise ValueError(f"unet_mode={unet_mode!r} is invalid: use one of {', '.join(UNET_MODES)}.")
    if resolution_px % 8:
        raise ValueError(f"resolution_px={resolution_px} is not a multiple of 8; use e.g. 512.")
    if train_text_embeddings and text_embeddings_precomputed:
        raise ValueError("Text embeddings cannot be both precomputed and trained; learned tokens need the "
                         "text encoder every step.")
    n = batch_size
    vae_encode = 0 if latents_precomputed else _vae_encode_flops(vae_config, resolution_px, n)
    text_fwd = text_bwd = 0
    if not text_embeddings_precomputed:
        text_fwd, text_bwd = _text_encoder_flops(text_config, n, train_text_embeddings)
    factor = _vae_downsampling(vae_config)
    latent_hw = resolution_px // factor
    unet_fwd, unet_bwd = _unet_flops(unet_config, latent_hw, n, unet_mode, lora_rank, lora_targets,
                                     train_text_embeddings, checkpointing=False)
    recompute = 0
    if activation_checkpointing and unet_bwd > 0:
        _, bwd_ckpt = _unet_flops(unet_config, latent_hw, n, unet_mode, lora_rank, lora_targets,
                                  train_text_embeddings, checkpointing=True)
        recompute = max(0, bwd_ckpt - unet_bwd)
    return FlopBreakdown(unet_forward=unet_fwd // n, unet_backward=unet_bwd // n, recompute=recompute // n,
                         vae_encode=vae_encode // n, text_encoder=text_fwd // n,
                         text_encoder_backward=text_bwd // n)


def flops_cache_dir() -> Path:
    """Where `cached_measure_flops` keeps its counts."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defect-ds" / "flops"


def cached_measure_flops(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], text_config: Any, *,
                         cache_dir: Path | None = None, **kwargs: Any) -> FlopBreakdown:
    """`measure_flops`, its result kept in `cache_dir` (default `flops_cache_dir()`). A cache that cannot be
    read or written is only slower: the count is measured and returned all the same."""
    text = text_config.to_dict() if hasattr(text_config, "to_dict") else dict(text_config)
    key = json.dumps({"unet": _public(unet_config), "vae": _public(vae_config),
                      "text": {k: v for k, v in _public(text).items() if k != "transformers_version"},
                      "kwargs": kwargs, "torch": torch.__version__,
                      "counter": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
                     sort_keys=True, default=str)
    path = Path(cache_dir or flops_cache_dir()) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        return FlopBreakdown(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    flops = measure_flops(unet_config, vae_config, text_config, **kwargs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, dataclasses.asdict(flops))
    except OSError:
        pass
    return flops


def measure_sd15(resolution_px: int = 512, **kwargs: Any) -> FlopBreakdown:
    """`measure_flops` for the real SD 1.5 architecture (LoRA with the default targets unless told)."""
    kwargs.setdefault("lora_targets", LoraConfig().target_modules)
    return measure_flops(SD15_UNET, SD15_VAE, SD15_TEXT, resolution_px=resolution_px, **kwargs)


# ---- the parts ----------------------------------------------------------------------------------
def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _vae_downsampling(vae_config: Mapping[str, Any]) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", (1, 1, 1, 1))) - 1)


def _vae_encode_flops(vae_config: Mapping[str, Any], resolution_px: int, n: int) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_public(vae_config)).eval()
        pixels = torch.empty(n, vae.config.in_channels, resolution_px, resolution_px)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(pixels).latent_dist.mean  # noqa: B018 (the trainer samples; same cost)
    return counter.get_total_flops()


def _text_encoder_flops(text_config: Any, n: int, train_embeddings: bool) -> tuple[int, int]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = text_config if isinstance(text_config, CLIPTextConfig) else CLIPTextConfig.from_dict(
        _public(text_config))
    with torch.device("meta"):
        model = CLIPTextModel(config).eval()
        input_ids = torch.zeros(n, TEXT_SEQUENCE_LENGTH, dtype=torch.long)
    model.requires_grad_(False)
    # textual inversion: only the token vectors train, so backward is input gradients down to them
    model.get_input_embeddings().weight.requires_grad_(train_embeddings)
    with torch.set_grad_enabled(train_embeddings), FlopCounterMode(display=False) as counter:
        hidden = model(input_ids)[0]
        forward = counter.get_total_flops()
        if train_embeddings:
            hidden.float().square().mean().backward()
    return forward, counter.get_total_flops() - forward


def build_meta_unet(unet_config: Mapping[str, Any], unet_mode: str, lora_rank: int,
                    lora_targets: Sequence[str]) -> torch.nn.Module:
    """The UNet on the meta device with adapters and trainable parameters as the trainer sets them."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_public(unet_config))
        if unet_mode == "lora":
            add_lora(unet, LoraConfig(rank=lora_rank, alpha=lora_rank, target_modules=list(lora_targets)))
    unet.train()
    set_unet_trainable(unet, unet_mode)
    return unet


def _unet_flops(unet_config: Mapping[str, Any], latent_hw: int, n: int, unet_mode: str, lora_rank: int,
                lora_targets: Sequence[str], train_text: bool, checkpointing: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of one UNet step on a batch of n."""
    unet = build_meta_unet(unet_config, unet_mode, lora_rank, lora_targets)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    cfg = unet.config
    with torch.device("meta"):
        latents = torch.empty(n, cfg.in_channels, latent_hw, latent_hw)
        timesteps = torch.zeros(n, dtype=torch.long)
        text = torch.empty(n, TEXT_SEQUENCE_LENGTH, cfg.cross_attention_dim, requires_grad=train_text)
    needs_backward = unet_mode != "frozen" or train_text
    with torch.set_grad_enabled(needs_backward), FlopCounterMode(display=False) as counter:
        out = unet(latents, timesteps, text).sample
        forward = counter.get_total_flops()
        if needs_backward:
            out.float().square().mean().backward()
    return forward, counter.get_total_flops() - forward
