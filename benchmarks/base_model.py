"""How good is a base model made by `defect-ds pretrain-base`: its codec and its samples.

    python benchmarks/base_model.py models/tiny-defect-base --out benchmarks/results

Reconstruction: PSNR of fresh synthetic good images per category, and thin-defect survival per
defect type: for a defect drawn into an image, the contrast the codec's round trip keeps inside the
mask, |rec(defect) - rec(clean)| / |defect - clean| (1 = all kept, 0 = erased); a defect survives at
0.5 or more. Samples: a grid per category, drawn by the stock diffusers pipeline. Writes
base-model-DATE.{md,json} and base-model-samples-DATE.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import diffusers
import numpy as np
import torch

from defect_ds.perf.sweep import cpu_name
from defect_ds.data.synthetic import CATEGORIES, DEFECT_TYPES, draw_sample


@torch.no_grad()
def round_trip(vae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((recon.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()


def codec_report(vae, size: int, per_type: int, seed: int) -> dict:
    out: dict = {"psnr_db": {}, "survival": {}}
    for c, category in enumerate(CATEGORIES):
        goods, pairs = [], {t: [] for t in DEFECT_TYPES}
        for i in range(per_type):
            goods.append(draw_sample(category, "good", np.random.default_rng([seed, c, 0, i]), size)[0])
            for d, defect_type in enumerate(DEFECT_TYPES):
                image, mask, clean, _ = draw_sample(category, defect_type, np.random.default_rng([seed, c, d + 1, i]), size)
                pairs[defect_type].append((image, mask, clean))
        goods = np.stack(goods)
        mse = ((round_trip(vae, goods) - goods.astype(np.float64)) ** 2).reshape(len(goods), -1).mean(1)
        out["psnr_db"][category] = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
        for defect_type, items in pairs.items():
            images = np.stack([p[0] for p in items])
            cleans = np.stack([p[2] for p in items])
            rec, rec_clean = round_trip(vae, images), round_trip(vae, cleans)
            ratios = []
            for k, (_, mask, _) in enumerate(items):
                drawn = np.abs(images[k].astype(np.float64) - cleans[k])[mask].mean()
                kept = np.abs(rec[k] - rec_clean[k])[mask].mean()
                ratios.append(kept / max(drawn, 1e-6))
            out["survival"].setdefault(defect_type, []).extend(ratios)
    out["survival"] = {t: {"mean_kept_contrast": float(np.mean(r)), "survived": float(np.mean(np.array(r) >= 0.5)),
                           "defects": len(r)} for t, r in out["survival"].items()}
    return out


@torch.no_grad()
def sample_grid(base: str, size: int, path: Path, per_category: int = 6, steps: int = 30) -> list[str]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from torchvision.utils import make_grid, save_image

    from defect_ds.data.captions import caption_for

    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption_for(words, "good", {}) for words in CATEGORIES.values()]
    rows = [pipe([p] * per_category, num_inference_steps=steps, guidance_scale=3.0, height=size, width=size,
                 generator=torch.Generator().manual_seed(1), output_type="pt").images for p in prompts]
    save_image(make_grid(torch.cat(rows), nrow=per_category, padding=2), path)
    return prompts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="a base model folder")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--per-type", type=int, default=24, help="images per category and defect type")
    p.add_argument("--seed", type=int, default=123, help="not the seeds the base or the demo data were drawn with")
    args = p.parse_args()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(args.base) / "vae", torch_dtype=torch.float32).eval()
    recipe = json.loads((Path(args.base) / "recipe.json").read_text())
    size = recipe["resolution_px"]
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codec = codec_report(vae, size, args.per_type, args.seed)
    grid = out / f"base-model-samples-{date}.png"
    prompts = sample_grid(args.base, size, grid)
    info = {"date": date, "device": cpu_name(), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "base": str(args.base), "recipe": recipe,
            "per_type": args.per_type, "seed": args.seed}
    (out / f"base-model-{date}.json").write_text(json.dumps({"info": info, **codec, "sample_rows": prompts}, indent=2))
    lines = [f"# Base model `{args.base}`: codec and samples ({date})", "",
             f"Device: {info['device']}, {info['threads']} threads, load average {info['load_average'][0]:.2f}; "
             f"torch {torch.__version__}, diffusers {diffusers.__version__}. Resolution {size} px; "
             f"{args.per_type} fresh synthetic images per category and defect type (seed {args.seed}).", "",
             "| category | reconstruction PSNR (dB) |", "|---|---|"]
    lines += [f"| {c} | {v:.2f} |" for c, v in codec["psnr_db"].items()]
    lines += ["", "| defect type | contrast kept inside the mask (mean) | survived (kept >= 0.5) |", "|---|---|---|"]
    lines += [f"| {t} | {v['mean_kept_contrast']:.2f} | {v['survived']:.2f} of {v['defects']} |"
              for t, v in codec["survival"].items()]
    lines += ["", f"Samples, one row per caption ({'; '.join(prompts)}): `{grid.name}`", "",
              f"Recipe: `{json.dumps(recipe, sort_keys=True)}`"]
    (out / f"base-model-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
