"""Freed host memory kept in the process, so a training step does not fault in fresh pages every time.

    python -c "from defect_ds.utils.memory import retain_freed_memory; print(retain_freed_memory())"

glibc's malloc hands large blocks back to the kernel when they are freed (a block over the mmap
threshold is unmapped, a free heap top over the trim threshold is trimmed). A training step on the CPU
allocates and frees the same large activation tensors every step, so every step pays page faults and
zeroing for memory it just returned. Raising the mmap threshold to glibc's maximum (32 MiB) and the
trim threshold out of reach (with a 1 GiB top pad, so the heap grows in large steps) keeps that memory
mapped: an SD 1.5-architecture step at 256 px ran about 10% faster on this project's CPU
(benchmarks/results/peer-2026-11-25-sd15-256px-b1-bf16-latents-malloc.md).
The cost is that the process's resident memory stays at its peak instead of falling between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
SETTINGS = {M_MMAP_THRESHOLD: 32 * 1024 * 1024, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 1 << 30}


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory; False (and nothing changed) where the C library is not
    glibc or refuses a setting."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only: musl and others name their options differently
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
