"""Loader throughput: samples per second per worker at 512 px (PNG decode + checks + joint transforms).

Writes synthetic shards at the source resolution into a temporary folder, then times whole epochs of
`build_loader` in the main process (num_workers=0, so the figure is one worker's rate) and, for
reference, with several workers. The result goes to benchmarks/results/loader-<date>.md.

    python benchmarks/bench_loader.py --source-px 512 --resolution-px 512 --samples 192
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import PIL
import numpy as np
import torch
import torchvision
import webdataset

from defect_ds.config import DataConfig
from defect_ds.data.loader import build_loader
from defect_ds.data.prepare import WriteOptions, synthetic_jobs, write_dataset
from defect_ds.data.synthetic import DEFECT_TYPES
from defect_ds.perf.sweep import cpu_name

TOKENS = {t: f"sks_{t}" for t in DEFECT_TYPES}


def time_epochs(cfg: DataConfig, batch: int, epochs: int) -> tuple[float, int]:
    """Best-of-epochs samples per second (after one warm-up epoch) and samples per epoch."""
    rates, samples = [], 0
    for epoch in range(epochs + 1):
        loader = build_loader(cfg, micro_batch_size=batch, rank=0, world_size=1, seed=0, epoch=epoch)
        start, samples = time.perf_counter(), 0
        for b in loader:
            samples += len(b["key"])
        if epoch > 0:
            rates.append(samples / (time.perf_counter() - start))
    return max(rates), samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-px", type=int, default=512, help="side of the images in the shards")
    parser.add_argument("--resolution-px", type=int, default=512, help="training resolution")
    parser.add_argument("--samples", type=int, default=192, help="samples in the shards")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--out", default=f"benchmarks/results/loader-{datetime.date.today()}.md",
                        help="markdown file the results are written to")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # what one DataLoader worker gets
    load_before = os.getloadavg()[0]
    per_defect = max(1, args.samples // 12)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = synthetic_jobs(resolution_px=args.source_px, per_defect=per_defect, good_per_category=per_defect,
                              seed=0, tokens=TOKENS, templates={}, categories=("pill", "screw", "surface"))
        write_dataset(jobs, tmp, WriteOptions(val_fraction=0.0, progress=False), defect_tokens=TOKENS)
        rows = []
        for workers in args.workers:
            cfg = DataConfig(train_shards=tmp, resolution_px=args.resolution_px, random_crop=True, hflip=True,
                             num_workers=workers, shuffle_buffer=256)
            rate, n = time_epochs(cfg, args.batch, args.epochs)
            rows.append((workers, rate, rate / max(1, workers), n))
            print(f"num_workers={workers}: {rate:.1f} samples/s total, {rate / max(1, workers):.1f} per worker")
    load_after = os.getloadavg()[0]
    resolved = dataclasses.asdict(cfg) | {"num_workers": "see table", "train_shards": "(temporary synthetic)"}
    lines = [
        f"# Loader throughput, {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/bench_loader.py --source-px {args.source_px} --resolution-px "
        f"{args.resolution_px} --samples {args.samples} --batch {args.batch} --epochs {args.epochs} --workers "
        f"{' '.join(map(str, args.workers))}`",
        "",
        f"- device: {cpu_name()}, {torch.get_num_threads()} torch thread per process, "
        f"{len(os.sched_getaffinity(0))} CPU cores available; 1-minute load average {load_before:.1f} before and "
        f"{load_after:.1f} after (other jobs on the machine lower the figures)",
        f"- python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"webdataset {webdataset.__version__}, pillow {PIL.__version__}, numpy {np.__version__}",
        f"- data: synthetic PNG shards, {rows[0][3]} samples of {args.source_px}x{args.source_px} px (image + mask), "
        f"micro batch {args.batch}",
        "- measured: whole epochs of `build_loader` (tar read, PNG decode of image and mask, checks, resize/crop, "
        "flips, normalisation, collation); best of the timed epochs after one warm-up epoch",
        "",
        "| num_workers | samples/s (rank total) | samples/s per worker |",
        "| ---: | ---: | ---: |",
        *[f"| {w} (main process) | {r:.1f} | {p:.1f} |" if w == 0 else f"| {w} | {r:.1f} | {p:.1f} |"
          for w, r, p, _ in rows],
        "",
        "Resolved data config:",
        "",
        "```json",
        json.dumps(resolved, indent=2),
        "```",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
