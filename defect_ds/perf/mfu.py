"""Throughput, MFU and HFU per log interval, against a per-device peak-FLOPs table.

    meter = ThroughputMeter(measure_flops(...), world_size=8, peak_tflops=peak_tflops(name, 0.0))
    for batch in loader:            # per micro batch:
        meter.data_wait(seconds)    #   time spent waiting for the batch (host clock, no sync)
        ...forward, backward, step...
        meter.step(len(batch))      #   samples this rank processed
    values = meter.report()         # at log steps only: the one CUDA sync is here

MFU counts the model FLOPs of a sample (forward, the backward actually needed, and the VAE and text
encoder when they run every step); HFU adds the activation-checkpoint recompute. Both are per device:
achieved TFLOP/s of this rank divided by the device's dense bf16 peak. On the CPU, which has no
table entry, the peak is measured at start-up: a large matmul in the run's compute dtype on the
threads this rank has (`defect_ds/perf/cpu_peak.py`).
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from defect_ds.config import LoraConfig, ModelConfig
from defect_ds.perf.cpu_peak import matmul_tflops
from defect_ds.perf.flops import FlopBreakdown, cached_measure_flops, measure_flops

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendor data sheets. Matched
# against torch.cuda.get_device_name(), most specific names first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM (reports as "NVIDIA H100 80GB HBM3")
    "H800": 989.0,
    "GH200": 989.0,
    "H200": 989.0,
    "A100": 312.0,  # SXM and PCIe alike
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
GIB = 2 ** 30


def peak_tflops(device_name: str, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` if positive, else the table, else None."""
    if override > 0:
        return float(override)
    name = device_name.lower()
    for key, value in PEAK_BF16_TFLOPS.items():  # insertion order: specific before general
        if key.lower() in name:
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class ThroughputMeter:
    """Accumulates samples and data-wait time over a log interval; `report` turns them into rates.

    `data_wait` and `step` only add host-side numbers; nothing here synchronises with the GPU until
    `report`, which the loop calls only when it logs.
    """

    def __init__(self, flops: FlopBreakdown, world_size: int = 1, peak_tflops: float | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.flops = flops
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Starts a new interval now (also call it after a pause such as a checkpoint save)."""
        self._start = time.perf_counter()
        self._samples = 0
        self._data_wait_s = 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def data_wait(self, seconds: float) -> None:
        """Adds time this rank spent waiting for its next batch."""
        self._data_wait_s += seconds

    def step(self, samples: int) -> None:
        """Adds the samples this rank processed in one micro batch."""
        self._samples += samples

    def report(self, elapsed: float | None = None, samples: int | None = None,
               data_wait: float | None = None) -> dict[str, float | None]:
        """The interval's rates; then a new interval starts.

        Without arguments it uses what `data_wait`/`step` accumulated and the wall clock since the
        interval started, taken after a CUDA sync so queued kernels are counted. A caller that keeps
        its own tallies passes them: `elapsed` seconds, `samples` of this rank, `data_wait` seconds.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: log steps only
        if elapsed is None:
            elapsed = time.perf_counter() - self._start
        samples = self._samples if samples is None else samples
        data_wait = self._data_wait_s if data_wait is None else data_wait
        elapsed = max(elapsed, 1e-9)
        per_device_samples_s = samples / elapsed
        model_tflops = per_device_samples_s * self.flops.model_flops / 1e12
        hardware_tflops = per_device_samples_s * self.flops.hardware_flops / 1e12
        peak = self.peak_tflops
        values: dict[str, float | None] = {
            "images_per_s": per_device_samples_s * self.world_size,
            "tflops_per_device": model_tflops,
            "hardware_tflops_per_device": hardware_tflops,
            "mfu": model_tflops / peak if peak else None,
            "hfu": hardware_tflops / peak if peak else None,
            "data_wait_share": min(1.0, data_wait / elapsed),
            "peak_tflops": peak,
        }
        values.update(memory_stats(self.device))
        self.reset()
        return values


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """Peak memory since the last reset. CUDA: allocated and reserved by the caching allocator.

    On the CPU there is no allocator to ask: both are None and `cpu_max_rss_gib` is the process's
    peak resident set size over its whole life (not per interval).
    """
    if device.type == "cuda":
        return {"peak_mem_alloc_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_mem_alloc_gib": None, "peak_mem_reserved_gib": None, "cpu_max_rss_gib": rss_bytes / GIB}


def make_meter(model_cfg: ModelConfig, lora_cfg: LoraConfig, resolution_px: int, vae: torch.nn.Module,
               model: torch.nn.Module, dist_info: Any, manifest: dict | None = None,
               peak_tflops_override: float = 0.0) -> ThroughputMeter:
    """The meter for a training run: FLOPs measured once from the run's own model configs (and kept in
    the user's cache: `cached_measure_flops`).

    `model` is the engine's module (with `.unet`, `.text_encoder`, `.text_trains`), `manifest` the
    training shards' manifest (kind "latents": no VAE per step), `peak_tflops_override` the
    logging section's peak_tflops (0: look the device up).
    """
    manifest = manifest or {}
    latents = manifest.get("kind") == "latents"
    text_trains = bool(getattr(model, "text_trains", False))
    flops = cached_measure_flops(
        dict(model.unet.config), dict(vae.config), model.text_encoder.config,
        resolution_px=resolution_px, unet_mode=model_cfg.unet_mode, lora_rank=lora_cfg.rank,
        lora_targets=list(lora_cfg.target_modules),
        activation_checkpointing=model_cfg.activation_checkpointing, train_text_embeddings=text_trains,
        latents_precomputed=latents,
        # the trainer reads stored text embeddings instead of running the encoder, unless tokens train
        text_embeddings_precomputed=latents and bool(manifest.get("text_embeddings")) and not text_trains)
    device = dist_info.device
    peak = peak_tflops(device_name(device), peak_tflops_override)
    if peak is None and device.type == "cpu":
        peak = matmul_tflops(getattr(model, "compute_dtype", torch.float32), seconds=0.3)
    return ThroughputMeter(flops, world_size=dist_info.world_size, peak_tflops=peak, device=device)
