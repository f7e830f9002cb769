"""What each part of the method adds: fine-tune, generate and score variants from the same shots and seeds.

    python benchmarks/ablation.py --out benchmarks/results

Variants (each against the full method, `make demo`'s settings):
  full          masked LoRA + mask-weighted loss + learned tokens, inpainting with every latent cell freed
  no-gating     plain LoRA: the adapters act on the whole image (`lora.mask_gating=false`)
  no-mask-loss  the loss weighs defect and background alike (`loss.background_weight=1`)
  no-tokens     no learned tokens: captions and prompts use the type's plain word (textual inversion off)
  no-finetune   no fine-tune at all: the base model inpaints the type's plain word
  nearest-mask  diffusers' own nearest shrink of the inpainting mask instead of the latent cells
Levers of the generator, measured the same way but not in the default list (they are not parts of the method):
  keep-recognisable  the full method's pairs, filtered by `generate --keep-recognisable` (a judge trained
                on the shots)
  conv-lora     mask-gated LoRA also on the convolutions of the finest latent level (32x32 at 64 px)
  attention-32  the full method fine-tuned on a base with attention (and so the gated adapters) also at the 32x32
                latent level, the shipped codec kept: make it first with
                `defect-ds pretrain-base work/data/base work/base-attention-32 --config configs/base-attention-32.toml
                --vae-from models/tiny-defect-base` (after `make work/data/base/manifest.json`)
  attention-32-long  attention-32 fine-tuned three times as long (1800 steps): the new adapters at 32x32 start
                from zero and 600 steps may be too few for them
  guidance-G    the full method's fine-tune, generated with guidance scale G instead of the demo's 6 (e.g. guidance-2)
  pairs-N       the full method's fine-tune, N generated pairs per defect type instead of the demo's 24 (e.g. pairs-96)
                (generation levers combine with +: guidance-2+pairs-96)

Resolution: `--resolution-px 96` (with its own --work and --runs) renders the data, fine-tunes, generates and
scores at 96 px, every variant and baseline alike; the base stays the shipped one, trained at 64 px. Its
validation draw must be rendered at the same size. Variants are comparable within one resolution only.

A lever is chosen on validation images, never on the test set: `--validation work/val/split` scores every
segmenter on the test side of an independent draw's split (`defect-ds prepare synthetic --seed 2`, split the
same way) instead of the ablation's own test images. `--baselines copy-paste` also trains that arm with the
same seeds and compares every variant with it, so a lever is judged against the cheap baseline as well.

Every stage (data, fine-tune, generation, each segmenter) is skipped when its output is there, so an
interrupted run resumes where it stopped. The segmenters of every variant train with the same seeds on the same test
set, so each variant is compared with the full method as a paired difference with a 95% bootstrap
interval over test images and seeds (defect_ds/downstream/compare.py). Writes ablation-DATE.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from defect_ds.data.sample import GOOD
from defect_ds.downstream import report
from defect_ds.downstream.cli import environment, load_pairs, load_test
from defect_ds.downstream.compare import compare
from defect_ds.downstream.runner import ArmData, SegmenterSettings, default_workers, run_jobs
from defect_ds.downstream.cli import FLIPS, STEPS, WIDTH

TYPES = ("crack", "scratch", "spot")
WORDS = ",".join(f"{t}={t}" for t in TYPES)
ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"]  # the default
FINEST_CONVS = [f"{block}.resnets.{i}.{conv}" for block, n in (("down_blocks.0", 1), ("up_blocks.3", 2))
                for i in range(n) for conv in ("conv1", "conv2")]  # the tiny base's 32x32 level
ATTENTION_32_BASE = "work/base-attention-32"  # configs/base-attention-32.toml, the shipped codec reused
VARIANTS = {  # name: (training overrides or None for no fine-tune, generation flags, plain-word data)
    "full": ([], [], False),
    "no-gating": (["--lora.mask_gating=false"], [], False),
    "no-mask-loss": (["--loss.background_weight=1.0"], [], False),
    "no-tokens": (["--textual_inversion.enabled=false"], ["--words", WORDS], True),
    "no-finetune": (None, ["--words", WORDS], True),
    "nearest-mask": ([], ["--inpaint-mask", "nearest"], False),
    "keep-recognisable": ([], ["--keep-recognisable"], False),
    "conv-lora": ([f"--lora.target_modules={','.join(ATTENTION + FINEST_CONVS)}"], [], False),
    "attention-32": ([f"--model.pretrained_dir={ATTENTION_32_BASE}"], [], False),
    "attention-32-long": ([f"--model.pretrained_dir={ATTENTION_32_BASE}", "--train.max_steps=1800"], [], False),
}
LEVERS = ("keep-recognisable", "conv-lora", "attention-32", "attention-32-long")
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in LEVERS]
SAME_RUN = {"nearest-mask": "full", "keep-recognisable": "full"}  # variants that differ only in generation reuse that fine-tune
GENERATION_LEVERS = {"guidance": "--guidance-scale", "pairs": "--num-per-type"}  # name-VALUE: the full fine-tune


def variant(name: str) -> tuple[list[str] | None, list[str], bool, str]:
    """A variant's (training overrides or None, generation flags, plain-word data, the fine-tune it uses)."""
    if name in VARIANTS:
        overrides, flags, words = VARIANTS[name]
        return overrides, flags, words, SAME_RUN.get(name, name)
    flags = []
    for part in name.split("+"):  # generation levers combine: guidance-2+pairs-96
        lever, _, value = part.partition("-")
        try:
            float(value)
        except ValueError:
            lever = ""
        if lever not in GENERATION_LEVERS:
            raise SystemExit(f"Unknown variant {name!r}: use {', '.join(VARIANTS)}, guidance-G, pairs-N or both "
                             "joined by +.")
        flags += [GENERATION_LEVERS[lever], value]
    return [], flags, False, "full"


def drawn_at(split: Path) -> int | None:
    """The resolution of the data a split was made from (its manifest), or None when that cannot be read."""
    try:
        data = Path(json.loads((split / "split.json").read_text())["data"])
        return int(json.loads((data / "manifest.json").read_text())["resolution_px"])
    except (OSError, KeyError, ValueError):
        return None


def sh(cmd: list[str], log: Path) -> None:
    """Runs one stage, its output in `log`; a failing stage stops the ablation with that log's tail."""
    print("+", " ".join(cmd), flush=True)
    with log.open("a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"}).returncode
    if rc:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"stage failed (exit {rc}): {' '.join(cmd)}\n" + "\n".join(tail))


def prepare(work: Path, words: bool, log: Path, bin_dir: Path, resolution: int = 64) -> Path:
    """The demo's data and split (plain-word captions when `words`); returns the split folder."""
    name = "words" if words else "tokens"
    data, split = work / f"data-{name}", work / f"split-{name}"
    if not (data / "manifest.json").is_file():
        flags = [f"--token={t}={t}" for t in TYPES] if words else []
        sh([str(bin_dir / "defect-ds"), "prepare", "synthetic", str(data), "--resolution-px", str(resolution),
            "--per-defect", "38", "--good-per-category", "70", "--no-progress", "--overwrite", *flags], log)
    if not (split / "split.json").is_file():
        sh([str(bin_dir / "defect-ds"), "downstream", "split", str(data), str(split), "--shots", "12",
            "--overwrite"], log)
    if not (split / "shots-latents" / "manifest.json").is_file():
        sh([str(bin_dir / "defect-ds"), "prepare", "latents", str(split / "shots"), str(split / "shots-latents"),
            "--pretrained", "models/tiny-defect-base", "--resolution-px", str(resolution), "--overwrite"], log)
    return split


def finetune(name: str, overrides: list[str], split: Path, runs: Path, log: Path, bin_dir: Path,
             resolution: int = 64) -> Path:
    run = runs / name
    export = run / "export" / "export.json"
    steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("--train.max_steps=")), 600)
    if export.is_file() and json.loads(export.read_text()).get("step") == steps:
        return run
    sh([str(bin_dir / "deepspeed"), "--log_level", "error", "--num_gpus", "2", "train.py", "--config",
        "configs/default.toml", f"--logging.run_dir={run}", f"--data.train_shards={split / 'shots-latents'}",
        "--checkpoint.resume=latest", f"--data.resolution_px={resolution}", *overrides], log)
    return run


def generate(name: str, run: Path | None, flags: list[str], split: Path, work: Path, log: Path, bin_dir: Path) -> Path:
    out = work / "generated" / name
    if (out / "shards" / "manifest.json").is_file():
        return out
    weights = ["--run", str(run)] if run else ["--base-model", "models/tiny-defect-base"]
    sh([str(bin_dir / "defect-ds"), "generate", str(out), *weights, "--mode", "inpaint", "--sources",
        str(split / "shots"), "--masks", "augmented", "--data", str(split / "shots"), "--num-per-type", "24",
        "--steps", "20", "--guidance-scale", "6", "--no-progress", *flags], log)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/ablation", help="data, splits and generated pairs")
    p.add_argument("--runs", default="runs/ablation", help="one fine-tune per variant")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--arm", default="generated", choices=("generated", "real+generated", "copy-paste+generated"),
                   help="the downstream arm each variant's pairs are scored in")
    p.add_argument("--validation", default="", help="a split of an independent draw whose test side scores the "
                   "segmenters (choosing a lever); default: the ablation's own test set")
    p.add_argument("--baselines", default="", help="comma-separated arms without generated pairs (real, copy-paste) "
                   "trained with the same seeds; every variant is compared with them too")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--resolution-px", type=int, default=64,
                   help="data, fine-tune, generation and segmenters at this size (use its own --work and --runs)")
    p.add_argument("--tag", default="", help="suffix of the results' file names")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "full" not in variants:
        raise SystemExit("--variants must include full: every variant is compared with it.")
    specs = {v: variant(v) for v in variants}
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if set(baselines) - {"real", "copy-paste"}:
        raise SystemExit(f"--baselines takes real and copy-paste only (got {args.baselines!r}).")
    on_attention_32 = [v for v in variants if v.startswith("attention-32")]
    if on_attention_32 and not (Path(ATTENTION_32_BASE) / "model_index.json").is_file():
        raise SystemExit(f"{on_attention_32[0]} needs its base in {ATTENTION_32_BASE}: make it with `defect-ds pretrain-base "
                         f"work/data/base {ATTENTION_32_BASE} --config configs/base-attention-32.toml --vae-from "
                         "models/tiny-defect-base` (about an hour on 2 cores).")
    validation = Path(args.validation) if args.validation else None
    if validation and not (validation / "test").is_dir():
        raise SystemExit(f"--validation {validation} has no test side: give a folder `defect-ds downstream split` wrote.")
    size = args.resolution_px
    if validation and (drawn := drawn_at(validation)) not in (None, size):
        raise SystemExit(f"--validation {validation} was drawn at {drawn} px and the ablation runs at {size} px: "
                         f"render the validation draw at {size} px too.")
    work, runs = Path(args.work), Path(args.runs)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "ablation.log"
    bin_dir = Path(sys.executable).parent
    times, generated_dirs = {}, {}
    for name in variants:
        overrides, flags, words, source = specs[name]
        started = time.time()
        split = prepare(work, words, log, bin_dir, size)
        run = None
        if overrides is not None:
            run = finetune(source, variant(source)[0], split, runs, log, bin_dir, size)
        generated_dirs[name] = generate(name, run, flags, split, work, log, bin_dir)
        times[name] = round(time.time() - started, 1)
        print(f"{name}: data, fine-tune and generation ready ({times[name]} s)", flush=True)

    split = work / "split-tokens"  # every variant is scored on the same test images (same keys, same pixels)
    shots = load_pairs(split / "shots", size, defects=True)
    goods = load_pairs(split / "shots", size, defects=False).images
    test = load_test((validation or split) / "test", size)
    generated = {name: load_pairs(path, size, defects=True) for name, path in generated_dirs.items()}
    data = ArmData(shots, goods, {}, test)
    rows = variants + baselines
    per_seed = {v: [None] * args.seeds for v in rows}
    evidence_by = {v: [None] * args.seeds for v in rows}

    # each variant is "an arm" whose generated pairs are its own; the arm kind decides the mixing
    data.generated = {f"{args.arm}@{v}": generated[v] for v in variants}
    jobs = [(f"{args.arm}@{v}", seed) for seed in range(args.seeds) for v in variants]
    jobs += [(b, seed) for seed in range(args.seeds) for b in baselines]
    started = time.time()

    def done(outcome) -> None:
        v = outcome.arm.split("@")[-1]
        per_seed[v][outcome.seed], evidence_by[v][outcome.seed] = outcome.scores, outcome.evidence
        print(f"  scored {v} seed {outcome.seed}", flush=True)

    run_jobs(jobs, data, SegmenterSettings(args.steps, 16, args.width, flips=FLIPS), workers=args.workers, grid_rows=[],
             on_done=done, cache_dir=work / "segmenters")
    comparisons = [c for c in compare(evidence_by, test.types, baselines=("full", *baselines))
                   if c["arm"] not in baselines]
    results = {"settings": {"arm": args.arm, "seeds": args.seeds, "steps": args.steps, "width": args.width,
                            "resolution_px": size,
                            "scored_on": str((validation or split) / "test"), "baselines": baselines,
                            "variants": {v: {"training_overrides": specs[v][0], "generation_flags": specs[v][1]}
                                         for v in variants}},
               "test": {"defect_images": int(sum(t != GOOD for t in test.types)),
                        "good_images": int(sum(t == GOOD for t in test.types))},
               "variants": {v: {"summary": report.summarise(per_seed[v]), "per_seed": per_seed[v],
                                "generated_pairs": len(generated[v]) if v in generated else 0,
                                "prepare_seconds": times.get(v, 0.0)} for v in rows},
               "comparisons": comparisons, "scoring_seconds": round(time.time() - started, 1),
               "environment": environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ablation-{datetime.date.today().isoformat()}{'-' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {out / stem}.{{json,md}}")
    return 0


def markdown(results: dict) -> str:
    s, env = results["settings"], results["environment"]
    lines = ["# Ablation: what each part of the method adds", "",
             f"Each variant's generated pairs scored in the `{s['arm']}` arm: {s['seeds']} segmenter seeds, "
             f"{s['steps']} steps, width {s['width']}, {s.get('resolution_px', 64)} px; scored on {s.get('scored_on', 'the test set')}: "
             f"{results['test']['defect_images']} defect and {results['test']['good_images']} good images (synthetic v2)."
             + (f" Arms without generated pairs, same seeds: {', '.join(s['baselines'])}." if s.get("baselines") else ""),
             f"Device: {env['device']}, load average {'/'.join(f'{x:.2f}' for x in env['load_average'])} at the end; "
             f"torch {env['torch']}.", "",
             "| variant | pixel AP (mean ± std over seeds) | image AUROC | " + " | ".join(f"{t} pixel AP" for t in TYPES)
             + " |", "|---|---|---" + "|---" * len(TYPES) + "|"]
    for v, r in results["variants"].items():
        a = r["summary"]["all"]
        by_type = [f"{r['summary'][t]['pixel_ap']['mean']:.3f}" if t in r["summary"] else "n/a" for t in TYPES]
        lines.append(f"| {v} | {a['pixel_ap']['mean']:.3f} ± {a['pixel_ap']['std']:.3f} | "
                     f"{a['image_auroc']['mean']:.3f} ± {a['image_auroc']['std']:.3f} | " + " | ".join(by_type) + " |")
    for metric in ("pixel_ap", "image_auroc"):
        against = " and each baseline arm" if s.get("baselines") else ""
        lines += ["", f"## {metric}: variant minus full method{against}, 95% interval", "",
                  *report.comparison_table(results["comparisons"], metric)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
