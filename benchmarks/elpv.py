"""ELPV end to end: does defect-ds give a better OK/NG solar-cell classifier from a few labelled defect cells?

    pip install 'defect-ds[elpv]'   # the data set, CC BY-NC-SA 4.0: a benchmark, never shipped
    make bench-elpv                 # = python benchmarks/elpv.py

Stages, each skipped when its output is there, so an interrupted run resumes where it stopped:
  data      `defect-ds prepare elpv` at 128 px, from the installed elpv_dataset package
  split     --shots defect cells (mono and poly in turn) are all the generator learns from; --pool-fraction
            of the other defect cells stay on the training side for the all-real ceiling; half the good
            cells are test images, the other half train
  base      `defect-ds pretrain-base` on the training side's good cells only, at --resolution-px
  finetune  the defect shots alone, encoded once (the shots folder also holds the good cells, whose empty
            masks would close the gate and train nothing), then masked LoRA + a token, configs/elpv.toml,
            on 2 CPU ranks
  strength  image-to-image of training good cells at each of --strengths (full masks: at 1.0 nothing of
            the source survives, which is text-to-image), scored by classifiers trained on the shots alone
            (never a test cell): the lowest strength whose cells they call defective nearly as often as at
            the best strength is chosen, keeping as much of the real cell as recognisability allows
  generate  --num-generated cells at that strength into training good cells
  eval      `defect-ds downstream eval --task classify`, every arm, --seeds seeds, paired intervals
  timing    the base's time per step at each of --time-resolutions (a 25-step run of each stage), for
            the full recipe's time projected from it: what a larger base would cost on this machine
  codec     at the base's and each of --time-resolutions: classifiers trained on half of the training
            side's cells (pool defects and good cells, never a test cell) score the other half as they are
            and after the base's codec (encode, decode); the paired difference says whether the defects
            survive it. At the other resolutions the codec is the same weights applied at that size

Writes benchmarks/results/elpv-DATE.{md,json} (the json is downstream.json plus the stages' record) and
WORK/elpv-DATE.png (real shots, generated cells, their sources): ELPV's licence keeps that picture, and
every image made from the data set, out of the repository.
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

from defect_ds.data.reader import iter_dataset
from defect_ds.data.sample import GOOD
from defect_ds.data.shards import ShardWriter, build_manifest, read_manifest, write_manifest
from defect_ds.downstream.arms import ArmSampler
from defect_ds.downstream.cli import environment, generated_sources, load_pairs
from defect_ds.downstream.segmenter import predict, train_segmenter
from defect_ds.utils.files import atomic_write_json, atomic_write_text

ARMS = "real,cutmix,generated,real+generated,cutmix+generated,all-real"
PROMPT = "an electroluminescence image of a {category} solar cell with {token}"
FINETUNE_STEPS = 600  # configs/elpv.toml's train.max_steps


class Stages:
    """Runs the stages in order, logs each command's output to WORK/elpv.log and times each stage. The times
    are written to WORK/stage-times.json as each stage ends, so a run stopped later, and then resumed with
    that stage skipped, still reports it."""

    def __init__(self, work: Path):
        self.work, self.log, self.times_file = work, work / "elpv.log", work / "stage-times.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        self.bin = Path(sys.executable).parent

    def sh(self, *cmd: str) -> None:
        """One command; a failing one stops the benchmark with the tail of its output."""
        print("  +", " ".join(cmd), flush=True)
        with self.log.open("a") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=os.environ | {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}).returncode
        if rc:
            tail = "\n".join(self.log.read_text().splitlines()[-15:])
            raise SystemExit(f"stage failed (exit {rc}): {' '.join(cmd)}\n{tail}")

    def run(self, name: str, done: bool, body) -> None:
        if done:
            print(f"{name}: done before, skipped", flush=True)
            return
        print(f"{name}: running", flush=True)
        started = time.time()
        body()
        self.times[name] = round(time.time() - started, 1)
        atomic_write_json(self.times_file, self.times, indent=2)
        print(f"{name}: {self.times[name]:.0f} s", flush=True)

    def tool(self, *args: str) -> None:
        self.sh(str(self.bin / "defect-ds"), *args)


def free_port() -> int:
    """A port no one listens on now, so the fine-tune does not collide with another run on the default."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def defect_only(shots: Path, out: Path) -> None:
    """The defect samples of a shards folder, as a shards folder of their own (same bytes, same keys)."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out)
    try:
        for item in iter_dataset(shots):
            defect_type = item["meta"].get("defect_type", "unknown")
            if defect_type == GOOD:
                continue
            writer.write("train", {"__key__": item["key"], "image.png": item["image"], "mask.png": item["mask"],
                                   "caption.txt": item["caption"].encode(), "json": json.dumps(item["meta"]).encode()},
                         defect_type)
        source = read_manifest(shots)
        write_manifest(out, build_manifest(writer.close(), created_by="benchmarks/elpv.py (defect shots only)",
                                           source={"data": str(shots)}, defect_tokens=source["defect_tokens"],
                                           caption_templates=source.get("caption_templates", {}),
                                           categories=source.get("categories", [])))
    except BaseException:
        writer.abort()
        raise


def generate_args(out: Path, run: Path, shots: Path, strength: float, num: int, seed: int) -> list[str]:
    return ["generate", str(out), "--run", str(run), "--mode", "inpaint", "--sources", str(shots), "--masks", "dataset",
            "--data", str(shots), "--num-per-type", str(num), "--strength", str(strength), "--steps", "20",
            "--guidance-scale", "6", "--prompt", PROMPT, "--seed", str(seed), "--no-progress"]


def recognisability(shots_dir: Path, generated: dict[float, Path], size: int, seeds: int, steps: int) -> dict:
    """Per strength: the mean defect probability that classifiers trained on the shots alone (`real` arm, one
    per seed) give the generated cells, and the share they call defective (p >= 0.5); the control is the
    same classifiers on the untouched source cells (near 0 when they learned defects, not cells)."""
    import torch

    torch.set_num_threads(1)
    shots = load_pairs(shots_dir, size, defects=True)
    goods = load_pairs(shots_dir, size, defects=False).images
    sampler = ArmSampler("real", shots, goods, None)
    cells = {s: load_pairs(path, size, defects=True) for s, path in generated.items()}
    source_keys = {s: [v.rsplit(":", 1)[-1] for v in generated_sources(path).values()] for s, path in generated.items()}
    by_key = dict(zip(load_pairs(shots_dir, size, defects=False).keys, goods))
    sources = np.stack([by_key[k] for k in sorted({k for ks in source_keys.values() for k in ks})])
    probs: dict[str, list[np.ndarray]] = {str(s): [] for s in generated} | {"sources": []}
    for seed in range(seeds):
        net = train_segmenter(sampler.defect_batch, sampler.good_batch, steps=steps, batch_size=16, seed=seed,
                              width=8, task="classify")
        for s, pairs in cells.items():
            probs[str(s)].append(predict(net, pairs.images))
        probs["sources"].append(predict(net, sources))
    return {name: {"mean_probability": round(float(np.mean(p)), 4),
                   "called_defective": round(float(np.mean(np.concatenate(p) >= 0.5)), 4),
                   "per_seed_mean": [round(float(x.mean()), 4) for x in p], "cells": int(p[0].size)}
            for name, p in probs.items()}


def halves(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two fixed halves of a set of cells: every other cell in key order (keys name module and
    position, so each half draws from every module)."""
    order = np.argsort(keys, kind="stable")
    return np.sort(order[0::2]), np.sort(order[1::2])


def resumable_by_key(path: Path, keys: list[str], compute) -> dict:
    """{key: compute(key)} kept in the JSON file `path` (its folder made if absent), written after each key so
    a stopped run resumes at the first key it lacks; keys already in the file are not computed again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(path.read_text()) if path.is_file() else {}
    for key in keys:
        if key not in done:
            done[key] = compute(key)
            atomic_write_json(path, done, indent=2)
    return done


def codec_survival(defects, goods, codec, size: int, seeds: int, steps: int, resamples: int = 2000) -> dict:
    """Do defect cells keep, through `codec` (uint8 NHWC images to images), what tells them from good ones?
    Classifiers (one per seed) train on half of `defects` and `goods` (Pairs at size x size) and score the other
    half as they are and after the codec: image AUROC and AP of each, their paired difference (round trip
    minus original) with a 95% bootstrap interval over cells and seeds, and the codec's PSNR on both kinds."""
    import torch

    from defect_ds.downstream.compare import compare, image_evidence

    torch.set_num_threads(1)
    (d_train, d_eval), (g_train, g_eval) = halves(defects.keys), halves(goods.keys)
    train_d = type(defects)(defects.images[d_train], defects.masks[d_train], [defects.types[i] for i in d_train],
                            [defects.keys[i] for i in d_train])
    sampler = ArmSampler("real", train_d, goods.images[g_train], None)
    originals = np.concatenate([defects.images[d_eval], goods.images[g_eval]])
    is_defect = np.arange(len(originals)) < len(d_eval)
    types = ["defect" if d else GOOD for d in is_defect]
    rebuilt = codec(originals)
    mse = ((rebuilt.astype(np.float64) - originals) ** 2).reshape(len(originals), -1).mean(axis=1)
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    runs: dict[str, list] = {"original": [], "round trip": []}
    for seed in range(seeds):
        net = train_segmenter(sampler.defect_batch, sampler.good_batch, steps=steps, batch_size=16, seed=seed,
                              width=8, task="classify")
        for name, cells in (("original", originals), ("round trip", rebuilt)):
            runs[name].append(image_evidence(predict(net, cells), is_defect))
    comparisons = compare(runs, types, baselines=("original",), metrics=("image_auroc", "image_ap"),
                          resamples=resamples)
    from sklearn.metrics import average_precision_score, roc_auc_score

    means = {name: {"image_auroc": round(float(np.mean([roc_auc_score(is_defect, e.image_score) for e in evs])), 4),
                    "image_ap": round(float(np.mean([average_precision_score(is_defect, e.image_score)
                                                      for e in evs])), 4)} for name, evs in runs.items()}
    return {"size_px": size, "seeds": seeds, "cells": {"train": {"defect": len(d_train), "good": len(g_train)},
                                                       "eval": {"defect": len(d_eval), "good": len(g_eval)}},
            "scores": means, "psnr_db": {"defect": round(float(psnr[is_defect].mean()), 2),
                                         "good": round(float(psnr[~is_defect].mean()), 2)},
            "comparisons": [c for c in comparisons if c["type"] == "all"]}


def vae_codec(vae_dir: Path, batch_size: int = 32):
    """The base's codec as images to images: encode to the posterior's mean, decode, back to uint8."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    @torch.no_grad()
    def codec(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    return codec


def choose_strength(scores: dict, tolerance: float) -> float:
    """The lowest strength whose share called defective is within `tolerance` of the best strength's."""
    strengths = sorted(float(s) for s in scores if s != "sources")
    best = max(scores[str(s)]["called_defective"] for s in strengths)
    return next(s for s in strengths if scores[str(s)]["called_defective"] >= best - tolerance)


def picture(shots_dir: Path, generated_dir: Path, path: Path, n: int = 8) -> None:
    """Three rows: real defect shots, generated cells, the good cells they were generated from."""
    from PIL import Image

    size = 128
    shots = load_pairs(shots_dir, size, defects=True).images[:n]
    gen = load_pairs(generated_dir, size, defects=True)
    src_of = generated_sources(generated_dir)
    goods = load_pairs(shots_dir, size, defects=False)
    by_key = dict(zip(goods.keys, goods.images))
    sources = [by_key.get(src_of[k].rsplit(":", 1)[-1], np.zeros((size, size, 3), np.uint8)) for k in gen.keys[:n]]
    rows = [list(shots), list(gen.images[:n]), sources]
    canvas = Image.new("RGB", (n * (size + 4), 3 * (size + 4)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(Image.fromarray(image), (c * (size + 4), r * (size + 4)))
    canvas.save(path)


def steps_per_second(train_log: Path) -> dict[str, float]:
    """Seconds per step of the VAE and the UNet stage from a pretrain-base train_log.jsonl (time_s counts
    from the start of the run, so the UNet's is the time after the VAE's last record; the first record
    includes set-up, so these are upper estimates)."""
    records = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    last = {stage: max((r for r in records if r.get("stage") == stage), key=lambda r: r["step"]) for stage in ("vae", "unet")}
    return {"vae": round(last["vae"]["time_s"] / last["vae"]["step"], 3),
            "unet": round((last["unet"]["time_s"] - last["vae"]["time_s"]) / last["unet"]["step"], 3)}


def markdown(record: dict, downstream_md: str) -> str:
    b, env = record["benchmark"], record["environment"]
    lines = ["# ELPV: do generated cells make a better OK/NG classifier?", "",
             f"Device: {env['device']}, load average {'/'.join(f'{x:.2f}' for x in env['load_average'])} at the end; "
             f"python {env['python']}, torch {env['torch']}. Command: `{b['command']}`.", "",
             f"Split: {b['split']['shots_per_type']} defect shots, pool {b['split']['pool']}, test "
             f"{b['split']['test']}. Base: `defect-ds pretrain-base` on {b['base']['good_cells']} training good cells at "
             f"{b['resolution_px']} px. Fine-tune: {FINETUNE_STEPS} steps on the shots alone (configs/elpv.toml).", "",
             "## Strength, chosen on the shots (classifiers trained on the shots alone, never a test cell)", "",
             "| strength | mean defect probability | called defective |", "|---|---|---|"]
    for s, r in b["strength"]["scores"].items():
        name = "untouched source cells (control)" if s == "sources" else s + (" (text-to-image)" if float(s) >= 1 else "")
        lines.append(f"| {name} | {r['mean_probability']:.3f} | {r['called_defective']:.3f} |")
    lines += ["", f"Chosen: strength {b['strength']['chosen']} (the lowest within {b['strength']['tolerance']} of the "
              "best share called defective).", "", "## Stage times (s)", "",
              "| " + " | ".join(b["times"]) + " |", "|" + "---|" * len(b["times"]),
              "| " + " | ".join(f"{t:.0f}" for t in b["times"].values()) + " |", "",
              "## The base's resolution: time on this machine", "",
              f"Seconds per step of `pretrain-base` ({b['recipe_steps']['vae']} VAE and {b['recipe_steps']['unet']} "
              "UNet steps in the recipe); at the benchmark's resolution from the base's own run, at the others from a "
              "25-step run of each stage. Both are upper estimates: the VAE's includes set-up, the UNet's the end of "
              "the VAE stage (its scaling factor and reconstruction check), which 25 steps do not amortise. The base "
              "takes at least the VAE stage's time and at most the projection.", "",
              "| px | VAE s/step | UNet s/step (at most) | VAE stage (min) | projected base time, at most (min) |",
              "|---|---|---|---|---|"]
    for px, t in sorted(b["resolution_timing"].items(), key=lambda kv: int(kv[0])):
        vae_minutes = b["recipe_steps"]["vae"] * t["vae"] / 60
        lines.append(f"| {px} | {t['vae']:.2f} | {t['unet']:.2f} | {vae_minutes:.0f} | {t['projected_minutes']:.0f} |")
    lines.append("")
    if b.get("codec"):
        lines += codec_markdown(b["codec"], b["resolution_px"])
    body = downstream_md.split("\n", 1)[1] if downstream_md.startswith("#") else downstream_md
    return "\n".join(lines) + "\n## Classifiers per arm (downstream eval --task classify)\n" + body


def codec_markdown(codec: dict, base_px: int) -> list[str]:
    first = next(iter(codec.values()))
    train, held = first["cells"]["train"], first["cells"]["eval"]
    lines = ["## Do the defects survive the codec?", "",
             f"Classifiers trained on half of the training side's cells ({train['defect']} pool defect and "
             f"{train['good']} good, never a test cell; one per seed, {first['seeds']} seeds) score the other half "
             f"({held['defect']} defect, {held['good']} good) as they are and after the base's codec. The codec is "
             f"the base's VAE, trained at {base_px} px; at the other sizes it is the same weights applied there (it "
             "is convolutional), not a VAE trained at that size.", "",
             "| px | AUROC, originals | AUROC, round trips | round trip minus original (AUROC) | (AP) | "
             "PSNR defect / good (dB) |", "|---|---|---|---|---|---|"]
    for px, r in sorted(codec.items(), key=lambda kv: int(kv[0])):
        diff = {c["metric"]: c for c in r["comparisons"]}
        cell = {m: f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] {c['verdict']}"
                for m, c in diff.items()}
        lines.append(f"| {px} | {r['scores']['original']['image_auroc']:.3f} | "
                     f"{r['scores']['round trip']['image_auroc']:.3f} | {cell['image_auroc']} | {cell['image_ap']} | "
                     f"{r['psnr_db']['defect']:.1f} / {r['psnr_db']['good']:.1f} |")
    return lines + [""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="work/elpv", help="data, split, base, latents, generated cells")
    p.add_argument("--run-dir", default="runs/elpv", help="the fine-tune's run directory")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shots", type=int, default=24, help="defect shots (mono and poly in turn)")
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--resolution-px", type=int, default=64, help="base, fine-tune, generation and classifier")
    p.add_argument("--strengths", default="0.5,0.7,0.85,1.0")
    p.add_argument("--strength-cells", type=int, default=48, help="cells generated per strength to choose it")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--num-generated", type=int, default=192)
    p.add_argument("--seeds", type=int, default=8, help="classifier seeds per arm")
    p.add_argument("--steps", type=int, default=900, help="classifier steps")
    p.add_argument("--time-resolutions", default="96,128", help="other base resolutions to time (empty: none)")
    p.add_argument("--codec-seeds", type=int, default=3, help="classifier seeds per resolution in the codec stage")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    work, run = Path(args.work), Path(args.run_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)
    data, split, base = work / "data", work / "split", work / "base"
    shots, fine_shots, latents = split / "shots", work / "finetune-shots", work / "finetune-latents"
    px = str(args.resolution_px)

    stages.run("data", (data / "manifest.json").is_file(),
               lambda: stages.tool("prepare", "elpv", str(data), "--resolution-px", "128", "--no-progress", "--overwrite"))
    stages.run("split", (split / "split.json").is_file(),
               lambda: stages.tool("downstream", "split", str(data), str(split), "--shots", str(args.shots),
                                   "--pool-fraction", str(args.pool_fraction), "--overwrite"))
    stages.run("base", (base / "model_index.json").is_file(),
               lambda: stages.tool("pretrain-base", str(shots), str(base), "--resolution-px", px, "--no-progress"))

    def finetune() -> None:
        if not (fine_shots / "manifest.json").is_file():
            defect_only(shots, fine_shots)
        if not (latents / "manifest.json").is_file():
            stages.tool("prepare", "latents", str(fine_shots), str(latents), "--pretrained", str(base),
                        "--resolution-px", px, "--overwrite", "--no-progress")
        stages.sh(str(stages.bin / "deepspeed"), "--log_level", "error", "--num_gpus", "2", "--master_port",
                  str(free_port()), "train.py", "--config",
                  "configs/elpv.toml", f"--model.pretrained_dir={base}", f"--data.train_shards={latents}",
                  f"--data.resolution_px={px}", f"--logging.run_dir={run}", "--checkpoint.resume=latest")
    export = run / "export" / "export.json"
    stages.run("finetune", export.is_file() and json.loads(export.read_text()).get("step") == FINETUNE_STEPS, finetune)

    strengths = [float(s) for s in args.strengths.split(",")]
    trial_dirs = {s: work / "strength" / f"{s:g}" for s in strengths}
    choice_file = work / "strength" / "choice.json"

    def strength() -> None:
        for s, out in trial_dirs.items():
            if not (out / "shards" / "manifest.json").is_file():
                stages.tool(*generate_args(out, run, shots, s, args.strength_cells, seed=1))
        scores = recognisability(shots, trial_dirs, args.resolution_px, seeds=2, steps=args.steps)
        atomic_write_json(choice_file, {"scores": scores, "tolerance": args.tolerance,
                                        "chosen": choose_strength(scores, args.tolerance)}, indent=2)
    stages.run("strength", choice_file.is_file(), strength)
    choice = json.loads(choice_file.read_text())

    generated = work / "generated"
    stages.run("generate", (generated / "shards" / "manifest.json").is_file(),
               lambda: stages.tool(*generate_args(generated, run, shots, choice["chosen"], args.num_generated, seed=0)))
    evaluation = work / "eval"
    stages.run("eval", (evaluation / "downstream.json").is_file(),
               lambda: stages.tool("downstream", "eval", str(split), str(evaluation), "--task", "classify", "--arms", ARMS,
                                   "--generated", str(generated), "--seeds", str(args.seeds), "--steps", str(args.steps),
                                   "--resolution-px", px, "--no-progress"))

    from defect_ds.pretrain.recipe import BaseRecipe

    recipe_steps = {"vae": BaseRecipe.vae_steps, "unet": BaseRecipe.unet_steps}
    timing = {str(args.resolution_px): steps_per_second(base / "train_log.jsonl")}
    for px in [int(r) for r in args.time_resolutions.split(",") if r.strip()]:
        trial = work / "resolution-trial" / str(px)
        stages.run(f"timing {px} px", (trial / "model_index.json").is_file(),
                   lambda: stages.tool("pretrain-base", str(shots), str(trial), "--resolution-px", str(px), "--vae-steps",
                                       "25", "--unet-steps", "25", "--sample-steps", "2", "--no-progress"))
        timing[str(px)] = steps_per_second(trial / "train_log.jsonl")
    for t in timing.values():
        t["projected_minutes"] = round((recipe_steps["vae"] * t["vae"] + recipe_steps["unet"] * t["unet"]) / 60, 1)

    from defect_ds.downstream.cli import load_pool

    codec_file = work / "codec" / "survival.json"
    codec_sizes = [args.resolution_px] + [int(r) for r in args.time_resolutions.split(",") if r.strip()]

    def codec() -> None:
        rebuild = vae_codec(base / "vae")

        def at(size: int) -> dict:
            print(f"  codec at {size} px", flush=True)
            return codec_survival(load_pool(split, size), load_pairs(shots, size, defects=False), rebuild, size,
                                  seeds=args.codec_seeds, steps=args.steps)
        resumable_by_key(codec_file, [str(s) for s in codec_sizes], lambda key: at(int(key)))
    stages.run("codec", codec_file.is_file() and all(str(s) in json.loads(codec_file.read_text())
                                                      for s in codec_sizes), codec)
    codec_record = json.loads(codec_file.read_text())

    stem = f"elpv-{datetime.date.today().isoformat()}{'-' + args.tag if args.tag else ''}"
    picture(shots, generated, work / f"{stem}.png")
    record = json.loads((evaluation / "downstream.json").read_text())
    times = stages.times  # kept across resumed runs: a skipped stage keeps its first time
    split_record = json.loads((split / "split.json").read_text())
    base_log = [json.loads(line) for line in (base / "train_log.jsonl").read_text().splitlines() if line.strip()]
    record["benchmark"] = {
        "command": "python benchmarks/elpv.py " + " ".join(sys.argv[1:]), "resolution_px": args.resolution_px,
        "split": {"shots_per_type": split_record["shots_per_type"],
                  "pool": {t: len(k) for t, k in split_record["pool"].items()},
                  "test": {t: len(k) for t, k in split_record["test"].items()}},
        "base": {"good_cells": sum(len(k) for t, k in split_record["shots"].items() if t == GOOD),
                 "steps": {stage: max(r["step"] for r in base_log if r.get("stage") == stage) for stage in ("vae", "unet")
                           if any(r.get("stage") == stage for r in base_log)}},
        "strength": choice, "num_generated": args.num_generated, "times": times, "recipe_steps": recipe_steps,
        "resolution_timing": timing, "codec": codec_record}
    record["environment"] = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", record, indent=2, sort_keys=True)
    atomic_write_text(out / f"{stem}.md", markdown(record, (evaluation / "downstream.md").read_text()))
    print(f"wrote {out / stem}.{{json,md}} and {work / stem}.png (the picture stays out of the repository)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
