"""The scaling model on paper (`defect_ds/perf/scaling.py`): per-GPU memory and step time of SD 1.5 training
at 512 px from 8 to 512 GPUs, by ZeRO stage, for full fine-tuning and LoRA; and, given a CPU sweep of the
SD 1.5 architecture (`benchmarks/sweep.py --arch sd15 ...`), the model's memory against what was measured.

    python benchmarks/scaling_model.py --out benchmarks/results/scaling-model-DATE
    python benchmarks/scaling_model.py --sweep benchmarks/results/sweep-cpu-DATE-sd15-full.json --out ...

Every GPU figure it writes is a prediction; the only measurements are the sweep's, on this machine's CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_ds.perf import scaling  # noqa: E402

WORLDS = (8, 16, 32, 64, 128, 256, 512)
STAGES = ("0", "1", "2", "3")


def _gb(x: float) -> str:
    return f"{x:.1f}"


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def stage_table(w: scaling.Workload, device: scaling.Device, micro: int, ckpt: bool, accum: int,
                mfu: float) -> list[str]:
    """Memory and step time of each stage at each scale, one micro batch size, `accum` micro batches."""
    lines = ["| GPUs | " + " | ".join(f"ZeRO-{s} GB / step s" for s in STAGES) + " |",
             "| ---: | " + " | ".join(["---"] * len(STAGES)) + " |"]
    for world in WORLDS:
        cells = []
        for stage in STAGES:
            p = scaling.predict(device, w, stage, world, micro, accum, ckpt, mfu)
            mark = "" if p.fits else " **does not fit**"
            cells.append(f"{_gb(p.memory_gb)}{mark} / {_s(p.step_s_overlap)}-{_s(p.step_s_no_overlap)}")
        lines.append(f"| {world} | " + " | ".join(cells) + " |")
    return lines


def choice_table(workloads: list[scaling.Workload], global_batch: int, mfu: float) -> list[str]:
    lines = ["| device | work | GPUs | stage | micro batch x accumulation | act. ckpt | GB per GPU | step s "
             "(overlap-none) | communication share | images/s per GPU |",
             "| --- | --- | ---: | --- | --- | --- | ---: | --- | ---: | ---: |"]
    for device in scaling.DEVICES:
        for w in workloads:
            for world in WORLDS:
                p = scaling.choose(device, w, world, global_batch, STAGES, mfu=mfu)
                if p is None:
                    lines.append(f"| {device.name} | {w.name} | {world} | nothing fits | | | | | | |")
                    continue
                share = p.comm_s / p.step_s_no_overlap
                lines.append(f"| {device.name} | {w.name} | {world} | ZeRO-{p.stage} | {p.micro_batch} x {p.accum} | "
                             f"{'on' if p.checkpointing else 'off'} | {_gb(p.memory_gb)} | "
                             f"{_s(p.step_s_overlap)}-{_s(p.step_s_no_overlap)} | {100 * share:.0f}% | "
                             f"{p.images_per_s_per_gpu:.1f} |")
    return lines


# ---- against the CPU sweep --------------------------------------------------------------------------
def predicted_cpu_bytes(point: dict[str, Any], workload: scaling.Workload, world: int, compute_bytes: int) -> float:
    """What the model puts on one CPU rank for a sweep point, without the process's fixed overhead (Python,
    torch, DeepSpeed, the data loader), which the comparison reads off the measurements."""
    p = point["point"]
    stage = p["zero"]
    states = scaling.state_bytes(stage, workload.trainable, 0, world)  # frozen weights: compute dtype, below
    frozen_engine = workload.frozen_engine * compute_bytes / (world if stage in ("3", "3o") else 1)
    if stage == "3o":  # on the CPU the offloaded states stay in the same memory
        states += workload.trainable * scaling.HOST_BYTES_3O / world
    act = workload.activation_bytes_ckpt if p["checkpointing"] else workload.activation_bytes
    buffers = scaling.buffer_bytes(stage, workload.trainable, workload.frozen_engine)
    return states + frozen_engine + workload.frozen_outside * compute_bytes + buffers + p["micro_batch"] * act


def sweep_check(sweep: dict[str, Any], workloads: dict[tuple[str, int], scaling.Workload]) -> list[str]:
    """Predicted against measured peak memory per rank for every point of a CPU sweep of SD 1.5."""
    env = sweep["environment"]
    world = env["processes"]
    lines = ["| point | ZeRO | UNet | act. ckpt | measured peak RSS per rank GiB | model without overhead GiB | "
             "difference GiB | status |", "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in sweep["points"]:
        p = r["point"]
        w = workloads[(p.get("unet_mode", "lora"), p.get("lora_rank") or 8)]
        precision = (r.get("config") or {}).get("train", {}).get("precision", "bf16")
        compute_bytes = 4 if precision == "fp32" else 2
        model = predicted_cpu_bytes(r, w, world, compute_bytes) / scaling.GIB
        ranks = (r.get("memory") or {}).get("rank_peak_rss_gib") or []
        measured = max(ranks) if ranks else None
        diff = "-" if measured is None else f"{measured - model:+.2f}"
        lines.append(f"| `{r['name']}` | {p['zero']} | {p.get('unet_mode', 'lora')} | "
                     f"{'on' if p['checkpointing'] else 'off'} | {'-' if measured is None else f'{measured:.2f}'} | "
                     f"{model:.2f} | {diff} | {r['status']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=f"benchmarks/results/scaling-model-{datetime.date.today()}",
                   help="path without suffix: OUT.md and OUT.json")
    p.add_argument("--global-batch", type=int, default=1024, help="images per optimizer step, fixed across scales")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed share of the bf16 peak the step's compute runs at")
    p.add_argument("--resolution-px", type=int, default=512)
    p.add_argument("--sweep", action="append", default=[], help="a CPU sweep of the SD 1.5 architecture (json) "
                   "to check the memory model against (repeatable)")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1 or args.global_batch < 1:
        print(f"{p.prog}: error: --mfu must be in (0, 1] and --global-batch 1 or more.", file=sys.stderr)
        return 2
    sweeps = [json.loads(Path(s).read_text()) for s in args.sweep]  # each checked with its own architecture
    full = scaling.sd15_workload("full", args.resolution_px)
    lora = scaling.sd15_workload("lora", args.resolution_px, lora_rank=8)
    command = "python benchmarks/scaling_model.py " + " ".join(argv or sys.argv[1:])
    lines = [f"# Scaling model on paper: SD 1.5 UNet at {args.resolution_px} px, 8 to 512 GPUs "
             f"({datetime.date.today()})", "",
             "Predictions, not measurements: no GPU was used. Model and its assumptions: "
             f"`defect_ds/perf/scaling.py` and docs/scaling.md. Command: `{command}`",
             "", "## Inputs", "", "| work | trainable parameters | frozen in the engine | frozen outside | "
             "activations per image GiB (ckpt off / on) | TFLOP per image (ckpt off / on) |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for w in (full, lora):
        lines.append(f"| {w.name} | {w.trainable:,} | {w.frozen_engine:,} | {w.frozen_outside:,} | "
                     f"{w.activation_bytes / scaling.GIB:.2f} / {w.activation_bytes_ckpt / scaling.GIB:.2f} | "
                     f"{w.flops / 1e12:.2f} / {w.flops_ckpt / 1e12:.2f} |")
    lines += ["", "Devices (nominal; per-direction link bandwidth per GPU):", "",
              "| device | memory GB | bf16 dense TFLOP/s | NVLink GB/s | InfiniBand GB/s per GPU | source |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for d in scaling.DEVICES:
        lines.append(f"| {d.name} | {d.memory_gb:g} | {d.bf16_tflops:g} | {d.nvlink_gbps:g} | {d.ib_gbps:g} | "
                     f"{d.source} |")
    lines += ["", f"## What to pick at each scale (global batch {args.global_batch}, MFU {args.mfu:.0%} assumed)",
              "",
              "The fitting setting with the most images/s per GPU under the no-overlap bound; step time as "
              "full overlap-no overlap.", "", *choice_table([full, lora], args.global_batch, args.mfu), ""]
    for d in scaling.DEVICES:
        for w in (full, lora):
            lines += [f"## {w.name} on {d.name}: every stage, micro batch 1, no accumulation, no checkpointing",
                      "", *stage_table(w, d, 1, False, 1, args.mfu), ""]
    if sweeps:
        workloads = {}
        for sweep in sweeps:
            res = sweep["environment"]["plan"]["resolution_px"]
            arch = sweep["environment"].get("arch", "sd15")
            for r in sweep["points"]:
                key = (r["point"].get("unet_mode", "lora"), r["point"].get("lora_rank") or 8)
                if key not in workloads:
                    workloads[key] = scaling.workload(arch, key[0], res, lora_rank=key[1])
            lines += [f"## Against this machine's sweep: {sweep['environment'].get('command')}", "",
                      f"{sweep['environment'].get('device')}, {sweep['environment']['processes']} ranks, "
                      f"{res} px. The difference is the process's own overhead if the model holds: it should "
                      "be about the same for every point.", "", *sweep_check(sweep, workloads), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".md").write_text("\n".join(lines))
    out.with_name(out.name + ".json").write_text(json.dumps({
        "workloads": [asdict(full), asdict(lora)], "devices": [asdict(d) for d in scaling.DEVICES],
        "state_bytes": scaling.STATE_BYTES, "global_batch": args.global_batch, "mfu": args.mfu,
        "choices": [asdict(c) for d in scaling.DEVICES for w in (full, lora) for world in WORLDS
                    if (c := scaling.choose(d, w, world, args.global_batch, STAGES, mfu=args.mfu))]}, indent=1))
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
