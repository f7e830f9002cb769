"""`defect-ds downstream`: does a segmenter trained on generated pairs find real defects better?

    defect-ds downstream split work/data/synthetic work/downstream
    defect-ds downstream eval work/downstream work/downstream/eval --arms real,copy-paste,generated,real+generated \
        --generated work/generated
    defect-ds downstream eval work/elpv-split work/elpv-eval --task classify --arms real,cutmix,all-real

`eval` trains the same small segmenter from scratch once per arm and seed and scores it on the split's
test set: pixel AP, pixel AUROC, pixel F1-max, IoU at the F1-max threshold, image AUROC. With
`--task classify` (image-level labels, e.g. ELPV) it trains the segmenter's encoder with a pooled head
and scores image AUROC, image AP, image F1-max and accuracy at the F1-max threshold.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import io

import numpy as np
from PIL import Image

from defect_ds.data.sample import DEFAULT_MAX_IMAGE_PIXELS, GOOD
from defect_ds.downstream import report
from defect_ds.downstream.arms import BASELINES, TASK_ARMS, Pairs
from defect_ds.downstream.compare import CLASSIFY_METRICS, METRICS, compare
from defect_ds.downstream.runner import ArmData, Outcome, SegmenterSettings, default_workers, run_jobs
from defect_ds.downstream.segmenter import DEFAULT_LOSS, LOSSES
from defect_ds.downstream.split import SPLIT_FILE, split_dataset
from defect_ds.data.reader import iter_dataset, load_mask, load_rgb
from defect_ds.utils.files import atomic_write_json

GRID_PER_TYPE = 2
# the segmenter's defaults, chosen by benchmarks/segmenter.py on validation images of an independent draw,
# never the test set (docs/downstream.md, The segmenter): `real` scored 0.40 at 300 steps, 0.57 at 600, 0.69 at
# 900 and 0.71 at 1500 (width 8, 4 seeds); width 16 at 300 steps (the same time as width 8 at 900) scored 0.50
STEPS = 900
WIDTH = 8
# a segmenter's test score is the mean over the image and its flips: on the demo's shots and the validation draw it
# lifted both baselines by +0.05 (paired, 8 seeds; segmenter-2026-12-03-demo-shots-amx.md) for 4 forward passes
FLIPS = True


def _decoded(data: bytes, where: str, what: str) -> Image.Image:
    """The image, once its header shows it within the pixel limit (a small PNG can decode to gigabytes)."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > DEFAULT_MAX_IMAGE_PIXELS:
        raise ValueError(f"The {what} of {where} is {image.width}x{image.height} pixels, over the limit of "
                         f"{DEFAULT_MAX_IMAGE_PIXELS}; remove it or resize it.")
    return image


def _read(item: dict) -> tuple[Image.Image, Image.Image | None]:
    image = _decoded(item["image"], item["where"], "image")
    if item["mask"] is None:
        return image, None
    mask = _decoded(item["mask"], item.get("mask_where") or item["where"], "mask")
    if mask.size != image.size:
        raise ValueError(f"The mask of {item['key']} ({item['where']}) is {mask.width}x{mask.height} but its image "
                         f"is {image.width}x{image.height}; a mask must match its image pixel for pixel.")
    return image, mask


def load_pairs(path: str | Path, size: int, *, defects: bool) -> Pairs:
    """Defect pairs (defects=True, empty masks dropped) or good images of a data set, at size x size."""
    images, masks, types, keys = [], [], [], []
    for item in iter_dataset(path):
        defect_type = item["meta"].get("defect_type", "unknown")
        if (defect_type != GOOD) != defects:
            continue
        image, mask_image = _read(item)
        mask = load_mask(mask_image, size) if mask_image is not None else np.zeros((size, size), np.uint8)
        if defects and not mask.any():
            continue
        images.append(load_rgb(image, size))
        masks.append(mask)
        types.append(defect_type)
        keys.append(item["key"])
    if not images:
        return Pairs(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8), [], [])
    return Pairs(np.stack(images), np.stack(masks), types, keys)


def load_test(path: Path, size: int) -> Pairs:
    images, masks, types, keys = [], [], [], []
    for item in iter_dataset(path):
        image, mask_image = _read(item)
        images.append(load_rgb(image, size))
        masks.append(load_mask(mask_image, size) if mask_image is not None else np.zeros((size, size), np.uint8))
        types.append(item["meta"].get("defect_type", "unknown"))
        keys.append(item["key"])
    return Pairs(np.stack(images), np.stack(masks), types, keys)


def check_counts(split_dir: Path, side: str, keys: list[str]) -> None:
    """What was read is what the split wrote: a shard cut short must not shrink a side silently."""
    record = json.loads((split_dir / SPLIT_FILE).read_text())
    expected = {k for ks in record[side].values() for k in ks}
    missing = expected - set(keys)
    if missing or len(keys) != len(expected):
        raise ValueError(f"{split_dir / side} holds {len(keys)} samples where {SPLIT_FILE} lists {len(expected)} "
                         f"({len(missing)} missing, e.g. {sorted(missing)[:1]}); a shard is damaged: re-run "
                         "`defect-ds downstream split`.")


def check_provenance(generated: Pairs, sources: dict[str, str], split_dir: Path) -> None:
    """Generated pairs must come from the split's training side: none drawn into a test image."""
    record = json.loads((split_dir / SPLIT_FILE).read_text())
    test_keys = {k for ks in record["test"].values() for k in ks}
    leaked = [(key, sources[key]) for key in generated.keys
              if sources.get(key) and sources[key].rsplit(":", 1)[-1] in test_keys]
    if leaked:
        raise ValueError(f"{len(leaked)} generated pair(s) were drawn into test images of {split_dir} (e.g. "
                         f"{leaked[0][0]} from {leaked[0][1]}); generate from this split's shots "
                         "(--sources SPLIT/shots) so no test image is seen in training.")


def generated_sources(path: str | Path) -> dict[str, str]:
    """key -> the source image each generated pair was inpainted into ("" for text-to-image)."""
    return {item["key"]: str((item["meta"].get("generation") or {}).get("source_image") or "")
            for item in iter_dataset(path)}


def parse_arms(text: str | None, generated: str | None, task: str = "segment") -> list[str]:
    known = TASK_ARMS[task]
    arms = [a.strip() for a in (text or ",".join(BASELINES[task])).split(",") if a.strip()]
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise ValueError(f"Unknown arm(s) {', '.join(unknown) or '(none given)'} in --arms for --task {task}; use some "
                         f"of {', '.join(known)}.")
    twice = sorted({a for a in arms if arms.count(a) > 1})
    if twice:
        raise ValueError(f"--arms names {', '.join(twice)} more than once; name each arm once.")
    if any("generated" in a for a in arms) and not generated:
        raise ValueError("The arms with generated pairs need --generated GEN_DIR (what `defect-ds generate` wrote).")
    return arms


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (("--seeds", args.seeds, 2), ("--steps", args.steps, 1),
                               ("--batch-size", args.batch_size, 2), ("--resolution-px", args.resolution_px, 8),
                               ("--width", args.width, 4), ("--resamples", args.resamples, 100),
                               ("--workers", args.workers, 1)):
        if value < least:
            raise ValueError(f"{flag} {value} is too small; use {least} or more"
                             + (" (a paired interval needs at least 2 seeds)." if flag == "--seeds" else "."))


def generation_settings(generated: str | None) -> dict | None:
    """What `defect-ds generate` recorded of the pairs (guidance, masks, export step), when it wrote them."""
    from defect_ds.generate.output import SETTINGS_FILE

    path = Path(generated or "") / SETTINGS_FILE
    if not generated or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); restore it or point --generated at the shards "
                         "folder inside.") from None


def environment() -> dict:
    """The machine and versions a result was measured with."""
    import sklearn
    import torch

    from defect_ds.utils.device import cpu_name

    return {"device": cpu_name(), "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "scikit_learn": sklearn.__version__}


def check_test(test: Pairs, task: str, where: Path) -> None:
    """The test set can score this task: defect pixels for a segmenter, both classes for a classifier."""
    is_defect = np.array([t != GOOD for t in test.types])
    if task == "classify" and not (is_defect.any() and (~is_defect).any()):
        missing, advice = (("good", "a larger --test-good-fraction") if is_defect.any() else
                           ("defect", "fewer --shots or a smaller --pool-fraction"))
        raise ValueError(f"The test set in {where} has no {missing} images; --task classify scores need both "
                         f"classes, so re-run the split with {advice}.")
    if task == "segment" and not test.masks[is_defect].any():
        raise ValueError(f"The test set in {where} has no defect pixel in any mask; the pixel scores "
                         "need real defects with masks.")


def load_pool(split_dir: Path, size: int) -> Pairs:
    """The split's training-side defect images that are not shots (the all-real arm's extra), checked."""
    record = json.loads((split_dir / SPLIT_FILE).read_text())
    if not record.get("pool") or not (split_dir / "pool").is_dir():
        raise ValueError(f"The arm all-real needs defect images kept on the training side, and {split_dir} has none; "
                         "re-run `defect-ds downstream split` with --pool-fraction 0.5, say.")
    check_counts(split_dir, "pool", [item["key"] for item in iter_dataset(split_dir / "pool")])
    return load_pairs(split_dir / "pool", size, defects=True)


def run_eval(args: argparse.Namespace) -> int:
    task = args.task
    arms = parse_arms(args.arms, args.generated, task)
    check_numbers(args)
    split_dir, out, size = Path(args.split_dir), Path(args.out), args.resolution_px
    if not (split_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(f"{split_dir} has no {SPLIT_FILE}; make it with `defect-ds downstream split DATA {split_dir}`.")
    if size % 8:
        raise ValueError(f"--resolution-px {size} must be a multiple of 8 (the segmenter halves it three times).")
    shots = load_pairs(split_dir / "shots", size, defects=True)
    goods = load_pairs(split_dir / "shots", size, defects=False).images
    check_counts(split_dir, "shots", [item["key"] for item in iter_dataset(split_dir / "shots")])
    test = load_test(split_dir / "test", size)
    check_counts(split_dir, "test", test.keys)
    check_test(test, task, split_dir / "test")
    test_defect = np.array([t != GOOD for t in test.types])
    pool = load_pool(split_dir, size) if "all-real" in arms else None
    if not len(shots) or not len(goods):
        raise ValueError(f"{split_dir / 'shots'} needs defect shots with masks and good images; re-run the split.")
    generation = generation_settings(args.generated)  # before anything is written
    generated = None
    if args.generated:
        generated = load_pairs(args.generated, size, defects=True)
        if not len(generated):
            raise ValueError(f"{args.generated} holds no image+mask pair with a defect; point --generated at "
                             "what `defect-ds generate` wrote.")
        check_provenance(generated, generated_sources(args.generated), split_dir)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out.mkdir(parents=True, exist_ok=True)
    flips = task == "segment" and not args.no_flips
    net = (f"DRAEM-style discriminative U-Net (width {args.width}, GroupNorm), {args.loss} loss" if task == "segment"
           else f"the segmenter's encoder (width {args.width}, GroupNorm), mean and max pooled, one linear unit, BCE")
    results = {"settings": {"task": task, "arms": arms, "seeds": args.seeds, "steps": args.steps,
                            "batch_size": args.batch_size, "resolution_px": size, "split_dir": str(split_dir),
                            "generated": args.generated, "width": args.width, "resamples": args.resamples,
                            "flips": flips,
                            "segmenter": f"{net}, AdamW with warm-up and clipping, good images 50/50"},
               "train": {"shots": len(shots), "good_images": len(goods),
                         "generated_pairs": len(generated) if generated is not None else 0,
                         "pool": len(pool) if pool is not None else 0},
               "test": {"defect_images": int(test_defect.sum()), "good_images": int((~test_defect).sum())},
               "generation": generation,
               "arms": {}}
    grid_rows = [] if task == "classify" else [
        i for t in sorted(set(test.types) - {GOOD}) for i in np.flatnonzero(np.array(test.types) == t)[:GRID_PER_TYPE]]
    grid_predictions: dict[str, np.ndarray] = {}
    per_seed: dict[str, list] = {arm: [None] * args.seeds for arm in arms}
    evidence_by_arm: dict[str, list] = {arm: [None] * args.seeds for arm in arms}
    data = ArmData(shots, goods, {arm: generated for arm in arms if "generated" in arm}, test, pool)
    settings = SegmenterSettings(args.steps, args.batch_size, args.width, args.loss, task=task, flips=flips)
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in arms]
    with Progress(TextColumn("[bold]downstream"), BarColumn(), MofNCompleteColumn(), TextColumn("segmenters"),
                  TimeRemainingColumn(), disable=args.no_progress, transient=False) as progress:
        bar = progress.add_task("downstream", total=len(jobs))

        def done(outcome: Outcome) -> None:
            per_seed[outcome.arm][outcome.seed] = outcome.scores
            evidence_by_arm[outcome.arm][outcome.seed] = outcome.evidence
            if outcome.grid is not None:
                grid_predictions[outcome.arm] = outcome.grid
            progress.advance(bar)

        kept = Path(args.segmenters) if args.segmenters else out / "segmenters"
        reused = run_jobs(jobs, data, settings, workers=args.workers, grid_rows=grid_rows, on_done=done,
                          cache_dir=kept)
    if reused:
        print(f"downstream: {reused} of {len(jobs)} segmenters were scored by an earlier run with the same data and "
              f"settings ({kept}); the rest trained now.", file=sys.stderr)
    for arm in arms:
        results["arms"][arm] = {"summary": report.summarise(per_seed[arm]), "per_seed": per_seed[arm]}
    results["comparisons"] = compare(evidence_by_arm, test.types, resamples=args.resamples, baselines=BASELINES[task],
                                     metrics=METRICS if task == "segment" else CLASSIFY_METRICS)
    results["environment"] = environment()  # the load average after the work it describes
    atomic_write_json(out / "downstream.json", results, sort_keys=True)
    report.write_markdown(results, out / "downstream.md")
    report.write_bar_plot(results, out / "downstream.png")
    written = "downstream.{json,md,png}"
    if task == "segment":
        report.write_prediction_grid(test.images[grid_rows], test.masks[grid_rows],
                                     {arm: grid_predictions[arm] for arm in arms}, out / "predictions.png")
        written += " and predictions.png"
    metric = report.MAIN_METRIC[task]
    print(f"downstream: {metric} by arm: " + ", ".join(
        f"{a} {r['summary']['all'][metric]['mean']:.3f}" for a, r in results["arms"].items())
        + ". " + report.verdict_sentence(results) + f" Wrote {out}/{written}", file=sys.stderr)
    return 0


def run_split(args: argparse.Namespace) -> int:
    record = split_dataset(args.data, args.out, shots=args.shots, test_good_fraction=args.test_good_fraction,
                           pool_fraction=args.pool_fraction, overwrite=args.overwrite)
    tests = {t: len(k) for t, k in record["test"].items()}
    pool = {t: len(k) for t, k in record["pool"].items()}
    print(f"downstream split: shots {record['shots_per_type']}, test {tests}, pool {pool}, train good images "
          f"{len(record['shots'][GOOD])}; wrote {args.out}/shots, {args.out}/test, {args.out}/pool, "
          f"{args.out}/{SPLIT_FILE}", file=sys.stderr)
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("downstream", help="score segmenters trained on real, copy-paste and generated defects",
                       description=__doc__.splitlines()[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    s = verbs.add_parser("split", help="few shots to learn from, the rest to test on")
    s.add_argument("data", help="training shards (`defect-ds prepare`)")
    s.add_argument("out", help="writes OUT/shots, OUT/test, OUT/split.json")
    s.add_argument("--shots", type=int, default=None, help="shots per defect type (default: a third, at least 1)")
    s.add_argument("--test-good-fraction", type=float, default=0.5,
                   help="share of the good images put in the test set; the rest train and take generated defects")
    s.add_argument("--pool-fraction", type=float, default=0.0,
                   help="share of each type's non-shot defect images kept on the training side in OUT/pool, for "
                        "the all-real arm only (default 0: every non-shot defect image is a test image)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=run_split)
    e = verbs.add_parser("eval", help="train a segmenter (or classifier) per arm and seed, score it on the test set")
    e.add_argument("split_dir", help="what `defect-ds downstream split` wrote")
    e.add_argument("out", help="writes downstream.json, downstream.md, downstream.png, predictions.png")
    e.add_argument("--task", choices=tuple(TASK_ARMS), default="segment",
                   help="segment: pixel masks; classify: image-level labels (a defect image's mask may be full)")
    e.add_argument("--arms", default=None, help="comma-separated; segment: " + ", ".join(TASK_ARMS["segment"])
                   + " (default real,copy-paste); classify: " + ", ".join(TASK_ARMS["classify"]) + " (default real,cutmix)")
    e.add_argument("--generated", help="a `defect-ds generate` output folder (needed by the generated arms)")
    e.add_argument("--seeds", type=int, default=8, help="segmenter seeds per arm (the same seeds for every arm)")
    e.add_argument("--steps", type=int, default=STEPS, help="segmenter training steps per arm and seed")
    e.add_argument("--batch-size", type=int, default=16, help="half defect samples, half good images")
    e.add_argument("--resolution-px", type=int, default=64)
    e.add_argument("--loss", choices=LOSSES, default=DEFAULT_LOSS,
                   help="bce-dice-image: BCE plus each defect image's own Dice (default); bce-dice: one Dice "
                        "over the batch (before 2026-12-03); focal: DRAEM's")
    e.add_argument("--width", type=int, default=WIDTH, help="channels of the segmenter's first level (x2 per level)")
    e.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the paired intervals")
    e.add_argument("--no-flips", action="store_true", default=not FLIPS,
                   help="score each test image alone, not as the mean over it and its flips (segment task)")
    e.add_argument("--workers", type=int, default=default_workers(),
                   help="segmenters trained at once, one thread each (default: 2 on machines with 2+ cores)")
    e.add_argument("--segmenters", help="where scored segmenters are kept and reused, by arm, seed and a fingerprint "
                                        "of their data and settings (default: OUT/segmenters)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_eval)
