"""The CPU's measured matmul peak, fp32 and bf16: there is no vendor table for the CPU, so MFU on the
CPU divides by what a large square matmul reaches on the cores this process may use.

    python -m defect_ds.perf.cpu_peak            # prints {"fp32": ..., "bf16": ...} TFLOP/s
"""
from __future__ import annotations

import json
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_tflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.5, threads: int = 0) -> float:
    """Best TFLOP/s of `size`-square matmuls over about `seconds`: the best, not the mean, because
    other work on a shared machine can only slow a repeat down, never speed it up."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.matmul(a, b, out=out)  # warm-up: oneDNN picks and caches its kernel here
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - start)
            if time.perf_counter() > deadline:
                break
        return 2 * size ** 3 / best / 1e12
    finally:
        torch.set_num_threads(old)


def cpu_peaks(seconds: float = 0.5, threads: int = 0) -> dict[str, float]:
    """{"fp32": TFLOP/s, "bf16": TFLOP/s} on this process's threads (or `threads`)."""
    return {name: round(matmul_tflops(dtype, seconds=seconds, threads=threads), 4) for name, dtype in DTYPES.items()}


if __name__ == "__main__":
    print(json.dumps(cpu_peaks(seconds=2.0)))
