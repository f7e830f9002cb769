"""Short codec trials: which VAE recipe keeps 1-3 px defects, before spending an hour on a base.

    python benchmarks/codec_trials.py work/data/base --steps 300 --out benchmarks/results
    python benchmarks/codec_trials.py work/data/base --steps 2400 --trials today    # one recipe, longer

Trains the VAE stage of `defect-ds pretrain-base` for a few hundred steps under each trial's recipe
changes, on the good images of DATA, then measures what benchmarks/base_model.py measures of a
finished base: reconstruction PSNR per category and thin-defect survival per defect type (fresh
synthetic images, seed 123). Also the spread of the latent means (what the scaling factor divides by)
and the posterior's mean std (the noise the decoder learns to tolerate). Writes codec-trials-DATE-STEPS-steps[-TRIALS].{md,json} (the trial ids when not the default set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from base_model import codec_report  # benchmarks/ is on the path when this script runs
from defect_ds.perf.sweep import cpu_name
from defect_ds.pretrain import stages
from defect_ds.pretrain.cli import load_good
from defect_ds.pretrain.recipe import BaseRecipe

# id -> (what the trial is, its recipe changes); "first" is the codec the first shipped base used
TRIALS = {
    "first": ("first base's codec (no stroke weight, logvar from 0)", {"vae_stroke_weight": 0.0, "vae_logvar_init": 0.0}),
    "logvar": ("logvar from -8", {"vae_stroke_weight": 0.0}),
    "today": ("logvar from -8, stroke weight 10 (today's recipe)", {}),
    "8ch": ("the same, 8 latent channels", {"vae_latent_channels": 8}),
    "stroke30": ("logvar from -8, stroke weight 30", {"vae_stroke_weight": 30.0}),
    "wide": ("today's recipe, channels 64, 128", {"vae_channels": (64, 128)}),
}
DEFAULT_TRIALS = "first,logvar,today,8ch"


def run_trial(images: torch.Tensor, changes: dict, steps: int, per_type: int) -> dict:
    recipe = BaseRecipe(**{**changes, "vae_steps": steps})  # not validated: 8 channels is a trial only
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        vae = stages.train_vae(images, recipe, Path(tmp) / "vae.pt", lambda step, values: None)
        seconds = time.perf_counter() - start
    mean, std = stages.encode(vae, images[:256])
    return {"changes": changes, "train_s": round(seconds, 1), "latent_mean_std": mean.std().item(),
            "posterior_std": std.mean().item(), **codec_report(vae, images.shape[-1], per_type, seed=123)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="shards made by `defect-ds prepare` (the base's data); only good images are used")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--per-type", type=int, default=12, help="images per category and defect type")
    p.add_argument("--trials", default=DEFAULT_TRIALS, help=f"comma-separated, of: {', '.join(TRIALS)}")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    chosen = [t.strip() for t in args.trials.split(",") if t.strip()]
    if unknown := [t for t in chosen if t not in TRIALS]:
        raise SystemExit(f"Unknown trial(s) {', '.join(unknown)}; choose from {', '.join(TRIALS)}.")
    images, _, _ = load_good(args.data, "train", None)
    results = {}
    for trial in chosen:
        name, changes = TRIALS[trial]
        results[name] = run_trial(images, changes, args.steps, args.per_type)
        print(name, json.dumps(results[name]["survival"]), flush=True)
    date = datetime.date.today().isoformat()
    info = {"date": date, "device": cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "data": args.data, "images": len(images), "steps": args.steps, "per_type": args.per_type}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"codec-trials-{date}-{args.steps}-steps" + ("" if args.trials == DEFAULT_TRIALS else "-" + "-".join(chosen))
    (out / f"{name}.json").write_text(json.dumps({"info": info, "trials": results}, indent=2))
    lines = [f"# Codec trials: {args.steps} VAE steps per recipe ({date})", "",
             f"Device: {info['device']}, {info['threads']} threads, load average {info['load_average'][0]:.2f}; "
             f"torch {torch.__version__}, diffusers {diffusers.__version__}. {len(images)} good images of "
             f"{args.data}; survival on {3 * args.per_type} fresh defects per type (seed 123). The rest of each "
             "recipe is `BaseRecipe()`'s.", "",
             "| trial | PSNR pill / screw / surface (dB) | posterior std / latent std | scratch | crack | spot |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        psnr = " / ".join(f"{v:.1f}" for v in r["psnr_db"].values())
        kept = [f"{r['survival'][t]['survived']:.2f} ({r['survival'][t]['mean_kept_contrast']:.2f})"
                for t in ("scratch", "crack", "spot")]
        lines.append(f"| {name} | {psnr} | {r['posterior_std']:.3f} / {r['latent_mean_std']:.3f} | "
                     + " | ".join(kept) + " |")
    lines += ["", "Per type: the share of defects that survive (keep at least half their contrast inside the "
              "mask), and in brackets the mean contrast kept."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
