"""Chooses the downstream segmenter's size and steps on the shots' side only, never on test images.

    python benchmarks/segmenter.py work/downstream work/downstream-val --configs 8x300,8x300:ema=0.99,16x300

Each config (WIDTHxSTEPS, then optional :ema=DECAY, :lr=PEAK, :batch=N, :flips=1, :loss=KIND, :members=K: K
segmenters per seed, their probabilities averaged, :colour=S: per-sample colour jitter of strength S in training) trains the `real` and `copy-paste` arms
(and, with --generated, the arms that use generated pairs) on the shots of SPLIT with SEEDS seeds and scores them on VALIDATION: the test side of a split of an independent draw of the same data set (for
the synthetic set, `defect-ds prepare synthetic --seed 2`), standing in for the user's own validation
images. Reported per config: each arm's per-seed pixel AP, its spread and worst seed (a collapse shows
there), the paired difference copy-paste minus real with its 95% interval (and every other arm against
both), and seconds per segmenter. A bigger net is worth its time only while it changes those differences. Writes segmenter-DATE.{json,md};
finished segmenters are kept in --cache, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import numpy as np

from defect_ds.downstream.arms import TASK_ARMS
from defect_ds.downstream.cli import environment, load_pairs, load_test
from defect_ds.downstream.compare import compare
from defect_ds.downstream.segmenter import DEFAULT_LOSS
from defect_ds.downstream.runner import ArmData, SegmenterSettings, default_workers, run_jobs

ARMS = ("real", "copy-paste")
GENERATED_ARMS = tuple(a for a in TASK_ARMS["segment"] if "generated" in a)


def parse_config(config: str, batch_size: int) -> SegmenterSettings:
    """"8x300:ema=0.99:lr=1e-3:batch=16:flips=1" -> SegmenterSettings (width 8, 300 steps, ...)."""
    size, *options = config.split(":")
    width, steps = (int(v) for v in size.split("x"))
    extra = dict(option.split("=") for option in options)
    unknown = set(extra) - {"ema", "lr", "batch", "flips", "loss", "members", "colour"}
    if unknown:
        raise SystemExit(f"Config {config!r} has unknown options {sorted(unknown)}; use ema, lr, batch, flips, loss, "
                         "members or colour.")
    if int(extra.get("members", 1)) < 1:
        raise SystemExit(f"Config {config!r} asks for {extra['members']} members; use at least 1.")
    return SegmenterSettings(steps, int(extra.get("batch", batch_size)), width, extra.get("loss", DEFAULT_LOSS),
                             learning_rate=float(extra.get("lr", 2e-3)), ema_decay=float(extra.get("ema", 0)),
                             flips=extra.get("flips", "0") not in ("0", "false", "no"),
                             members=int(extra.get("members", 1)), colour=float(extra.get("colour", 0)))


def arm_record(per_seed: list[dict]) -> dict:
    """One arm's per-seed pixel AP, its mean, spread and worst seed, and the mean per defect type."""
    ap = np.array([s["all"]["pixel_ap"] for s in per_seed])
    return {"pixel_ap": ap.round(4).tolist(), "mean": round(float(ap.mean()), 4), "std": round(float(ap.std()), 4),
            "worst": round(float(ap.min()), 4),
            "by_type": {t: round(float(np.mean([s[t]["pixel_ap"] for s in per_seed])), 4)
                        for t in per_seed[0] if t != "all"}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("split", help="the split whose shots train the segmenters (`defect-ds downstream split`)")
    p.add_argument("validation", help="a split of an independent draw; its test side scores them")
    p.add_argument("--configs", default="8x300,16x300", help="comma-separated WIDTHxSTEPS[:ema=D][:lr=L][:batch=N][:flips=1][:loss=K][:members=K][:colour=S]")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated of {', '.join(ARMS + GENERATED_ARMS)} (the differences need real and copy-paste)")
    p.add_argument("--generated", default=None,
                   help="generated pairs (`defect-ds generate` output) for the arms that use them; made from SPLIT's shots")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    p.add_argument("--cache", default="work/segmenter-cache",
                   help="finished segmenters, by a fingerprint of their data and settings: a rerun skips them")
    args = p.parse_args()
    size = 64
    split, val = Path(args.split), Path(args.validation)
    data = ArmData(load_pairs(split / "shots", size, defects=True),
                   load_pairs(split / "shots", size, defects=False).images, {}, load_test(val / "test", size))
    arms = tuple(a for a in args.arms.split(",") if a)
    if not arms or set(arms) - set(ARMS + GENERATED_ARMS):
        raise SystemExit(f"--arms takes {', '.join(ARMS + GENERATED_ARMS)} (got {args.arms!r}).")
    needs_pairs = [a for a in arms if a in GENERATED_ARMS]
    if needs_pairs and not args.generated:
        raise SystemExit(f"The arms {', '.join(needs_pairs)} need --generated (a `defect-ds generate` output folder).")
    if needs_pairs:
        pairs = load_pairs(Path(args.generated), size, defects=True)
        if not len(pairs):
            raise SystemExit(f"{args.generated} holds no image+mask pair with a defect; point --generated at "
                             "what `defect-ds generate` wrote.")
        data.generated = {a: pairs for a in needs_pairs}
    results = {"settings": vars(args), "configs": {}}
    evidence_of: dict[str, dict] = {}  # config -> arm -> per-seed evidence, for the configs' paired differences
    for config in args.configs.split(","):
        settings = parse_config(config, args.batch_size)
        per_seed = {a: [None] * args.seeds for a in arms}
        evidence_by = {a: [None] * args.seeds for a in arms}
        unflipped = {a: [None] * args.seeds for a in arms}  # with flips: the same nets scored without them
        seconds_each: list[float] = []

        def done(o) -> None:
            per_seed[o.arm][o.seed], evidence_by[o.arm][o.seed] = o.scores, o.evidence
            unflipped[o.arm][o.seed] = o.unflipped
            if getattr(o, "seconds", None) is not None:  # outcomes kept by an older version have no time
                seconds_each.append(o.seconds)

        started = time.time()
        reused = run_jobs([(a, s) for s in range(args.seeds) for a in arms], data,
                 settings, workers=args.workers, grid_rows=[], on_done=done, cache_dir=Path(args.cache))
        seconds = time.time() - started
        comparisons = [c for c in compare(evidence_by, data.test.types, baselines=ARMS, metrics=("pixel_ap",))
                       if c["type"] == "all"]
        diff = next((c for c in comparisons if (c["arm"], c["baseline"]) == ("copy-paste", "real")), None)
        record = {"settings": dataclasses.asdict(settings),
                  "seconds_per_segmenter": (round(float(np.mean(seconds_each)), 1) if seconds_each else None
                                            if reused else round(seconds * args.workers / (len(arms) * args.seeds), 1)),
                  "copy_paste_minus_real": diff, "comparisons": comparisons, "arms": {}}
        for a in arms:
            record["arms"][a] = arm_record(per_seed[a])
        if settings.flips and all(u is not None for a in arms for u in unflipped[a]):
            # the flips' own effect, paired: the same segmenters, the same test images (segmenters kept
            # before scores without flips were kept beside them have none)
            record["unflipped"] = {a: arm_record([u[0] for u in unflipped[a]]) for a in arms}
            record["flips_minus_unflipped"] = {
                a: [c for c in compare({"flips": evidence_by[a], "unflipped": [u[1] for u in unflipped[a]]},
                                       data.test.types, baselines=("unflipped",), metrics=("pixel_ap",))
                    if c["type"] == "all"][0] for a in arms}
        evidence_of[config] = evidence_by
        first = next(iter(evidence_of))
        if config != first:  # the same seeds and images: each arm's paired difference from the first config
            record["against_first"] = {
                a: compare({config: evidence_by[a], first: evidence_of[first][a]}, data.test.types,
                           baselines=(first,), metrics=("pixel_ap",)) for a in arms}
        results["configs"][config] = record
        print(config, json.dumps(record), flush=True)
    results["environment"] = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"segmenter-{datetime.date.today().isoformat()}{'-' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["# Segmenter size and steps, chosen on validation images (never the test set)", "",
             f"Shots: {split}/shots{'; generated pairs: ' + args.generated if needs_pairs else ''}; validation: {val}/test ({len(data.test)} images); {args.seeds} seeds, batch "
             f"{args.batch_size}, {args.workers} workers of one thread. Device: {results['environment']['device']}, "
             f"load average {'/'.join(f'{x:.2f}' for x in results['environment']['load_average'])} at the end.", "",
             "| config | " + " | ".join(f"{a}: pixel AP mean ± std (worst seed)" for a in arms)
             + " | copy-paste − real [95%] | s per segmenter |", "|---" * (len(arms) + 3) + "|"]
    for config, r in results["configs"].items():
        cells = [f"{r['arms'][a]['mean']:.3f} ± {r['arms'][a]['std']:.3f} ({r['arms'][a]['worst']:.3f})" for a in arms]
        d = r["copy_paste_minus_real"]
        difference = f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if d else "-"
        lines.append(f"| {config} | {' | '.join(cells)} | {difference} | {r['seconds_per_segmenter'] or '-'} |")
        if "unflipped" in r:
            cells = [f"{r['unflipped'][a]['mean']:.3f} ± {r['unflipped'][a]['std']:.3f} ({r['unflipped'][a]['worst']:.3f})"
                     for a in arms]
            lines.append(f"| {config}, the same nets without flips | {' | '.join(cells)} | - | - |")
    others = {c: [d for d in r["comparisons"] if d["arm"] not in ARMS] for c, r in results["configs"].items()}
    if any(others.values()):
        lines += ["", "Arms with generated pairs against real and copy-paste (pixel AP, 95% interval over seeds and images):", ""]
        for c, rows in others.items():
            lines.append(f"- {c}: " + "; ".join(f"{d['arm']} vs {d['baseline']} {d['difference']:+.3f} "
                                                 f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] {d['verdict']}" for d in rows))
    against = {c: r["against_first"] for c, r in results["configs"].items() if "against_first" in r}
    if against:
        lines += ["", f"Each config minus the first ({next(iter(results['configs']))}), the same seeds and images "
                  "(pixel AP, 95% interval over seeds and images; all types, then each type):", ""]
        for c, per_arm in against.items():
            for a, rows in per_arm.items():
                lines.append(f"- {c}, {a}: " + "; ".join(
                    f"{d['type']} {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] {d['verdict']}"
                    for d in rows))
    flipped = {c: r["flips_minus_unflipped"] for c, r in results["configs"].items() if "flips_minus_unflipped" in r}
    if flipped:
        lines += ["", "Flips minus no flips, the same segmenters (pixel AP, 95% interval over seeds and images):", ""]
        for c, per_arm in flipped.items():
            lines.append(f"- {c}: " + "; ".join(f"{a} {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                                                 f"{d['verdict']}" for a, d in per_arm.items()))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
