"""Recognisability: does a segmenter trained on real defects find each generated defect inside its mask?

    python benchmarks/recognisability.py work/data/synthetic work/generated --out benchmarks/results

A judge (the downstream segmenter) trains on every real defect of DATA with its good images. For each
generated pair, the defect counts as found when the judge's highest probability inside the mask is
0.5 or more. The control is the same mask on the pair's source image (the good image before
inpainting): what the judge "finds" where nothing was drawn. Writes recognisability-DATE.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from defect_ds.perf.sweep import cpu_name
from defect_ds.downstream.arms import ArmSampler
from defect_ds.downstream.cli import generation_settings, load_pairs
from defect_ds.downstream.segmenter import predict, train_segmenter
from defect_ds.data.reader import iter_dataset, load_mask, load_rgb


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="real data set (training shards): the judge learns every defect in it")
    p.add_argument("generated", help="a `defect-ds generate --mode inpaint` output folder")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--resolution-px", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    size = args.resolution_px
    real = load_pairs(args.data, size, defects=True)
    goods = load_pairs(args.data, size, defects=False).images
    sampler = ArmSampler("real", real, goods, None)
    judge = train_segmenter(sampler.defect_batch, sampler.good_batch, steps=args.steps, batch_size=16, seed=args.seed)
    found: dict[str, list[tuple[bool, bool]]] = {}
    for item in iter_dataset(args.generated):
        if item["mask"] is None or item["source"] is None:
            continue
        mask = load_mask(item["mask"], size).astype(bool)
        if not mask.any():
            continue
        images = np.stack([load_rgb(item["image"], size), load_rgb(item["source"], size)])
        probs = predict(judge, images)
        found.setdefault(item["meta"].get("defect_type", "unknown"), []).append(
            (bool(probs[0][mask].max() >= 0.5), bool(probs[1][mask].max() >= 0.5)))
    if not found:
        raise SystemExit(f"{args.generated} has no inpainted pair with a mask and a source image.")
    rows = {t: {"recognised": float(np.mean([f[0] for f in v])), "control_on_source": float(np.mean([f[1] for f in v])),
                "pairs": len(v)} for t, v in sorted(found.items())}
    date = datetime.date.today().isoformat()
    info = {"date": date, "device": cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "data": args.data,
            "generated": args.generated, "judge_steps": args.steps, "resolution_px": size, "seed": args.seed,
            "judge_training_defects": len(real), "judge_training_goods": len(goods)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = generation_settings(args.generated) or {}
    info["generation"] = {k: gen.get(k) for k in ("export", "export_step", "mask_source", "precision", "steps",
                                                  "guidance_scale")}
    (out / f"recognisability-{date}.json").write_text(json.dumps({"info": info, "per_type": rows}, indent=2))
    lines = [f"# Recognisability of generated defects ({date})", "",
             f"Pairs: `{args.generated}` (export `{gen.get('export')}` at step {gen.get('export_step')}, "
             f"`--masks {gen.get('mask_source')}`, {gen.get('steps')} sampling steps, guidance "
             f"{gen.get('guidance_scale')}, {gen.get('precision')}).", "",
             f"Judge: the downstream segmenter, {args.steps} steps on {len(real)} real defect images and "
             f"{len(goods)} good images of `{args.data}`. Found: the judge's maximum inside the mask >= 0.5. "
             f"Control: the same mask on the pair's source (good) image.", "",
             f"Device: {info['device']}, {info['threads']} threads, load average {info['load_average'][0]:.2f}; "
             f"torch {torch.__version__}.", "",
             "| defect type | found in generated | found on the source (control) | pairs |", "|---|---|---|---|"]
    lines += [f"| {t} | {r['recognised']:.2f} | {r['control_on_source']:.2f} | {r['pairs']} |" for t, r in rows.items()]
    (out / f"recognisability-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
