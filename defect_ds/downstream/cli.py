"""`defect-ds downstream`: does a segmenter trained on generated pairs find real defects better?

    defect-ds downstream split work/data/synthetic work/downstream
    defect-ds downstream eval work/downstream work/downstream/eval --arms real,copy-paste,generated,real+generated \
        --generated work/generated

`eval` trains the same small segmenter from scratch once per arm and seed and scores it on the split's
test set: pixel AP, pixel AUROC, pixel F1-max, IoU at the F1-max threshold, image AUROC.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from defect_ds.data.sample import GOOD
from defect_ds.downstream import report
from defect_ds.downstream.arms import ARMS, ArmSampler, Pairs
from defect_ds.downstream.scores import score_by_type
from defect_ds.downstream.segmenter import predict, train_segmenter
from defect_ds.downstream.split import SPLIT_FILE, split_dataset
from defect_ds.data.reader import iter_dataset, load_mask, load_rgb

GRID_PER_TYPE = 2


def load_pairs(path: str | Path, size: int, *, defects: bool) -> Pairs:
    """Defect pairs (defects=True, empty masks dropped) or good images of a data set, at size x size."""
    images, masks, types, keys = [], [], [], []
    for item in iter_dataset(path):
        defect_type = item["meta"].get("defect_type", "unknown")
        if (defect_type != GOOD) != defects:
            continue
        mask = load_mask(item["mask"], size) if item["mask"] is not None else np.zeros((size, size), np.uint8)
        if defects and not mask.any():
            continue
        images.append(load_rgb(item["image"], size))
        masks.append(mask)
        types.append(defect_type)
        keys.append(item["key"])
    if not images:
        return Pairs(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8), [], [])
    return Pairs(np.stack(images), np.stack(masks), types, keys)


def load_test(path: Path, size: int) -> Pairs:
    images, masks, types, keys = [], [], [], []
    for item in iter_dataset(path):
        images.append(load_rgb(item["image"], size))
        masks.append(load_mask(item["mask"], size))
        types.append(item["meta"].get("defect_type", "unknown"))
        keys.append(item["key"])
    return Pairs(np.stack(images), np.stack(masks), types, keys)


def parse_arms(text: str, generated: str | None) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"Unknown arm(s) {', '.join(unknown) or '(none given)'} in --arms; use some of {', '.join(ARMS)}.")
    if any("generated" in a for a in arms) and not generated:
        raise ValueError("The arms generated and real+generated need --generated GEN_DIR (what `defect-ds generate` wrote).")
    return arms


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

    from defect_ds.perf.sweep import cpu_name

    return {"device": cpu_name(), "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__, "scikit_learn": sklearn.__version__}


def run_eval(args: argparse.Namespace) -> int:
    arms = parse_arms(args.arms, args.generated)
    split_dir, out, size = Path(args.split_dir), Path(args.out), args.resolution_px
    if not (split_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(f"{split_dir} has no {SPLIT_FILE}; make it with `defect-ds downstream split DATA {split_dir}`.")
    if size % 8:
        raise ValueError(f"--resolution-px {size} must be a multiple of 8 (the segmenter halves it three times).")
    shots = load_pairs(split_dir / "shots", size, defects=True)
    goods = load_pairs(split_dir / "shots", size, defects=False).images
    test = load_test(split_dir / "test", size)
    test_defect = np.array([t != GOOD for t in test.types])
    if not test.masks[test_defect].any():
        raise ValueError(f"The test set in {split_dir / 'test'} has no defect pixel in any mask; the pixel scores "
                         "need real defects with masks.")
    if not len(shots) or not len(goods):
        raise ValueError(f"{split_dir / 'shots'} needs defect shots with masks and good images; re-run the split.")
    generation = generation_settings(args.generated)  # before anything is written
    generated = None
    if args.generated:
        generated = load_pairs(args.generated, size, defects=True)
        if not len(generated):
            raise ValueError(f"{args.generated} holds no image+mask pair with a defect; point --generated at "
                             "what `defect-ds generate` wrote.")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {"arms": arms, "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
                            "resolution_px": size, "split_dir": str(split_dir), "generated": args.generated,
                            "segmenter": f"DRAEM-style discriminative U-Net (width {args.width}), {args.loss} loss, good images 50/50"},
               "train": {"shots": len(shots), "good_images": len(goods),
                         "generated_pairs": len(generated) if generated is not None else 0},
               "test": {"defect_images": int(test_defect.sum()), "good_images": int((~test_defect).sum())},
               "generation": generation,
               "arms": {}}
    grid_rows = [i for t in sorted(set(test.types) - {GOOD}) for i in np.flatnonzero(np.array(test.types) == t)[:GRID_PER_TYPE]]
    grid_predictions = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=args.no_progress, transient=False) as progress:
        task = progress.add_task("downstream", total=len(arms) * args.seeds * args.steps)
        for arm in arms:
            sampler = ArmSampler(arm, shots, goods, generated)
            per_seed = []
            for seed in range(args.seeds):
                progress.update(task, description=f"{arm} seed {seed}")
                net = train_segmenter(sampler.defect_batch, sampler.good_batch, steps=args.steps,
                                      batch_size=args.batch_size, seed=seed, width=args.width,
                                      loss=args.loss,
                                      on_step=lambda _: progress.advance(task))
                probs = predict(net, test.images)
                per_seed.append(score_by_type(probs, test.masks, test.types))
                if seed == 0:
                    grid_predictions[arm] = probs[grid_rows]
            results["arms"][arm] = {"summary": report.summarise(per_seed), "per_seed": per_seed}
    results["environment"] = environment()  # the load average after the work it describes
    (out / "downstream.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    report.write_markdown(results, out / "downstream.md")
    report.write_bar_plot(results, out / "downstream.png")
    report.write_prediction_grid(test.images[grid_rows], test.masks[grid_rows], grid_predictions,
                                 out / "predictions.png")
    best = report.winner(results)
    print(f"downstream: pixel AP by arm: " + ", ".join(
        f"{a} {r['summary']['all']['pixel_ap']['mean']:.3f}" for a, r in results["arms"].items())
        + f"; {best} won. Wrote {out}/downstream.{{json,md,png}} and predictions.png", file=sys.stderr)
    return 0


def run_split(args: argparse.Namespace) -> int:
    record = split_dataset(args.data, args.out, shots=args.shots, test_good_fraction=args.test_good_fraction,
                           overwrite=args.overwrite)
    tests = {t: len(k) for t, k in record["test"].items()}
    print(f"downstream split: shots {record['shots_per_type']}, test {tests}, train good images "
          f"{len(record['shots'][GOOD])}; wrote {args.out}/shots, {args.out}/test, {args.out}/{SPLIT_FILE}",
          file=sys.stderr)
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
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=run_split)
    e = verbs.add_parser("eval", help="train a segmenter per arm and seed, score it on the test set")
    e.add_argument("split_dir", help="what `defect-ds downstream split` wrote")
    e.add_argument("out", help="writes downstream.json, downstream.md, downstream.png, predictions.png")
    e.add_argument("--arms", default="real,copy-paste", help=f"comma-separated, of {', '.join(ARMS)}")
    e.add_argument("--generated", help="a `defect-ds generate` output folder (needed by the generated arms)")
    e.add_argument("--seeds", type=int, default=3)
    e.add_argument("--steps", type=int, default=500, help="segmenter training steps per arm and seed")
    e.add_argument("--batch-size", type=int, default=16, help="half defect samples, half good images")
    e.add_argument("--resolution-px", type=int, default=64)
    e.add_argument("--loss", choices=("bce-dice", "focal"), default="bce-dice")
    e.add_argument("--width", type=int, default=16, help="channels of the segmenter's first level (x2 per level)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_eval)
