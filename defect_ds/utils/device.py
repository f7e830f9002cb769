"""Which device and which compute dtype: one rule for training, latents, generation and evaluation.

    python -c "from defect_ds.utils.device import resolve_device, resolve_dtype as d; print(d('auto', resolve_device()))"
"""
from __future__ import annotations

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; any other name is torch's (cpu, cuda:1)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and fp32 on the CPU (where bf16 matmuls are slow); else bf16 or fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"Precision {precision!r} is invalid: use auto, bf16 or fp32.")
    return PRECISIONS[precision]
