"""Mask conditioning by masked LoRA: adapter updates on spatial tokens are gated by the defect mask.

Every LoRA adapter that acts on spatial features (self-attention q/k/v/out, cross-attention q/out,
feed-forward and projection layers) has its update multiplied by the segmentation mask, resized to
that layer's own token grid (8x8, 4x4, ... for a 64x64 latent) and still exactly 0/1. Two resizes:
`nearest` samples one pixel per token; `max` (the default, as in the run config) marks a token as
defect when any pixel of its patch is, so a scratch thinner than a token's patch is never dropped
(nearest keeps a 1 px scratch only where it happens to cross the sampled pixel).
Cross-attention keys and values act on text tokens, which have no position, and are not gated.
So the fine-tuned behaviour lives only inside the mask and the frozen base model paints the rest.

An all-ones mask multiplies every update by exactly 1.0 and so reproduces the plain LoRA UNet bit
for bit; it is what inference uses when no mask is given. With no mask set the hooks do nothing.

    gate = enable_mask_gating(unet)      # after LoRA layers exist (peft or diffusers' load_lora_weights)
    with mask_context(unet, mask):       # mask: (B, 1, H, W), 0/1, any resolution of the image
        noise_pred = unet(latents, t, text).sample
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from defect_ds.model.lora_targets import TEXT_SIDE_TARGETS


RESIZE_MODES = ("nearest", "max")


def resize_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "max") -> torch.Tensor:
    """A (B, 1, H, W) 0/1 mask resized to `size`, still exactly 0/1.

    nearest: one sampled pixel per output cell; max: 1 where any pixel of the cell's patch is 1
    (on upsampling both are nearest).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"Unknown mask resize {mode!r}: use one of {', '.join(RESIZE_MODES)}.")
    mask = mask.float()
    if mode == "max" and (size[0] < mask.shape[-2] or size[1] < mask.shape[-1]):
        return F.adaptive_max_pool2d(mask, size)
    return F.interpolate(mask, size=size, mode="nearest")


class MaskGate:
    """Holds the current mask and gates the outputs of the hooked LoRA up-projections."""

    def __init__(self, resize: str = "max") -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"Unknown mask resize {resize!r}: use one of {', '.join(RESIZE_MODES)}.")
        self.resize = resize
        self.mask: torch.Tensor | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.gated_layers: list[str] = []
        self._cache: dict[tuple, torch.Tensor] = {}

    def set(self, mask: torch.Tensor | None) -> None:
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1):
            raise ValueError(f"A mask must have shape (batch, 1, height, width), got {tuple(mask.shape)}.")
        self.mask = mask
        self._cache.clear()

    def gate_for(self, output: torch.Tensor) -> torch.Tensor | None:
        """The mask resized (nearest or max) to the grid of `output`, broadcastable to it, or None."""
        mask = self.mask
        if mask is None or output.dim() not in (3, 4):
            return None
        key = (tuple(output.shape), output.dtype, output.device)
        if key not in self._cache:
            if output.dim() == 4:  # conv adapter: (B, C, h, w)
                h, w = output.shape[-2:]
            else:  # linear adapter on tokens: (B, h*w, C)
                h, w = grid_for_tokens(mask.shape[-2:], output.shape[1])
            gate = resize_mask(mask, (h, w), self.resize).to(output.dtype)
            batch = output.shape[0]
            if batch != gate.shape[0]:
                if batch % gate.shape[0]:
                    raise ValueError(f"The mask batch ({gate.shape[0]}) does not divide the UNet batch "
                                     f"({batch}); pass one mask per sample.")
                gate = gate.repeat(batch // gate.shape[0], 1, 1, 1)  # classifier-free guidance halves
            if output.dim() == 3:
                gate = gate.flatten(2).transpose(1, 2)  # (B, h*w, 1)
            self._cache[key] = gate.to(output.device)
        return self._cache[key]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def grid_for_tokens(mask_hw: tuple[int, int] | torch.Size, num_tokens: int) -> tuple[int, int]:
    """The (h, w) grid of `num_tokens` spatial tokens for an image of size mask_hw (stride-2 downsampling)."""
    H, W = int(mask_hw[0]), int(mask_hw[1])
    stride = 1
    while stride <= max(H, W):
        h, w = -(-H // stride), -(-W // stride)
        if h * w == num_tokens:
            return h, w
        stride *= 2
    raise ValueError(f"{num_tokens} tokens match no downsampled grid of a {H}x{W} mask.")


def is_spatial_adapter(module_name: str) -> bool:
    return not module_name.endswith(TEXT_SIDE_TARGETS)


def enable_mask_gating(unet: nn.Module, resize: str = "max") -> MaskGate:
    """Hooks every spatial LoRA layer of `unet`; returns the gate (also kept as `unet.mask_gate`).

    resize: how the mask reaches each layer's grid, `nearest` or `max` (see `resize_mask`)."""
    from peft.tuners.lora import LoraLayer

    old = getattr(unet, "mask_gate", None)
    if isinstance(old, MaskGate):
        old.remove()
    gate = MaskGate(resize)

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        g = gate.gate_for(output)
        return None if g is None else output * g

    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and is_spatial_adapter(name):
            for up in module.lora_B.values():
                gate.handles.append(up.register_forward_hook(hook))
            gate.gated_layers.append(name)
    # stored outside the module tree so it never shows up in state dicts or parameter lists
    object.__setattr__(unet, "mask_gate", gate)
    return gate


def set_mask(unet: nn.Module, mask: torch.Tensor | None) -> None:
    gate = getattr(unet, "mask_gate", None)
    if gate is None:
        raise ValueError("This UNet has no mask gating; call enable_mask_gating(unet) after adding LoRA.")
    gate.set(mask)


@contextlib.contextmanager
def mask_context(unet: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    set_mask(unet, mask)
    try:
        yield
    finally:
        set_mask(unet, None)
