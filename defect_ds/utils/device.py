"""Which device and which compute dtype: one rule for training, latents, generation and evaluation.

    python -c "from defect_ds.utils.device import resolve_device, resolve_dtype as d; print(d('auto', resolve_device()))"
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of bf16 dot-product instructions


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; any other name is torch's (cpu, cuda:1)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 dot products natively (avx512_bf16 or AMX). Without them oneDNN
    emulates bf16 and it is slower than fp32; with them a matmul ran 2.2x the fp32 rate here."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def cpu_name() -> str:
    """The CPU's model name, for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and on a CPU with native bf16 (avx512_bf16, AMX), else fp32; or bf16, fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"Precision {precision!r} is invalid: use auto, bf16 or fp32.")
    return PRECISIONS[precision]
