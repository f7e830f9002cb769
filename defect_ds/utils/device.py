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


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return flags


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 dot products natively (avx512_bf16 or AMX). Without them oneDNN
    emulates bf16 and it is slower than fp32; with them a matmul ran 2.2x the fp32 rate here."""
    flags = _cpu_flags(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name and kind, for benchmark records: `AMD EPYC (avx512_bf16)`, `Intel Xeon
    (amx_bf16)`, or `(no native bf16, avx2)`; results and speed choices differ between the kinds."""
    cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = _cpu_flags(cpuinfo)
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if native:
        return f"{name} ({native[0]})"
    vector = next((f for f in ("avx512f", "avx2") if f in flags), "")
    return f"{name} (no native bf16{', ' + vector if vector else ''})" if flags else name


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and on a CPU with native bf16 (avx512_bf16, AMX), else fp32; or bf16, fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"Precision {precision!r} is invalid: use auto, bf16 or fp32.")
    return PRECISIONS[precision]
