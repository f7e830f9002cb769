"""`defect-ds generate --keep-recognisable`: drop generated pairs whose defect a judge cannot find in the mask.

The judge is the downstream segmenter trained on the shots alone (their defect images and good images,
never a test image). A pair is kept when the judge's highest probability inside the pair's mask reaches
the threshold. Dropped pairs move from samples/ to dropped/ (nothing is deleted), so every reader of the
folder (shards/, the MVTec tree, `downstream eval`) sees the kept ones only; a rerun with another
threshold sorts both folders again. OUT_DIR/recognisability.json records the judge, each pair's score
and the kept and dropped counts per defect type, beside the control: the same mask on the pair's source
image (inpaint mode), where nothing was drawn.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from defect_ds.data.reader import load_mask, load_rgb
from defect_ds.utils.files import atomic_write_json

REPORT_FILE = "recognisability.json"


@dataclass(frozen=True)
class JudgeSettings:
    data: str  # the shots (shards folder) the judge trains on
    steps: int = 900
    width: int = 8
    threshold: float = 0.5
    seed: int = 0
    flips: bool = True


def train_judge(settings: JudgeSettings, resolution: int,
                on_step: Callable[[int], None] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The downstream segmenter trained on the shots of `settings.data`; returns images -> probability maps."""
    from defect_ds.downstream.arms import ArmSampler
    from defect_ds.downstream.cli import load_pairs
    from defect_ds.downstream.segmenter import predict, train_segmenter

    shots = load_pairs(settings.data, resolution, defects=True)
    goods = load_pairs(settings.data, resolution, defects=False).images
    if not len(shots) or not len(goods):
        raise ValueError(f"The judge of --keep-recognisable trains on defect and good images; {settings.data} has "
                         f"{len(shots)} defect and {len(goods)} good image(s). Point --judge-data at the shots.")
    sampler = ArmSampler("real", shots, goods, None)
    net = train_segmenter(sampler.defect_batch, sampler.good_batch, steps=settings.steps, batch_size=16,
                          seed=settings.seed, width=settings.width, on_step=on_step)
    return lambda images: predict(net, images, flips=settings.flips)


def judge_samples(out_dir: Path, judge: Callable[[np.ndarray], np.ndarray], settings: JudgeSettings,
                  resolution: int) -> dict:
    """Scores every finished sample of OUT_DIR (kept or dropped before), writes recognisability.json and
    returns it; `apply` then sorts the folders."""
    samples = {}
    out_dir = Path(out_dir)
    for meta_file in sorted([*(out_dir / "samples").glob("*/json"), *(out_dir / "dropped").glob("*/json")]):
        folder = meta_file.parent
        meta = json.loads(meta_file.read_text())
        mask = load_mask(folder / "mask.png", resolution).astype(bool)
        images = [load_rgb(folder / "image.png", resolution)]
        if (folder / "source.png").is_file():
            images.append(load_rgb(folder / "source.png", resolution))
        probs = judge(np.stack(images))
        score = float(probs[0][mask].max()) if mask.any() else 0.0
        samples[folder.name] = {"defect_type": meta["defect_type"], "score": round(score, 4),
                                "kept": score >= settings.threshold,
                                "score_on_source": round(float(probs[1][mask].max()), 4)
                                if len(images) > 1 and mask.any() else None}
    per_type: dict[str, dict] = {}
    for s in samples.values():
        row = per_type.setdefault(s["defect_type"], {"pairs": 0, "kept": 0, "dropped": 0, "found_on_source": 0})
        row["pairs"] += 1
        row["kept" if s["kept"] else "dropped"] += 1
        row["found_on_source"] += int((s["score_on_source"] or 0.0) >= settings.threshold)
    report = {"judge": asdict(settings), "per_type": dict(sorted(per_type.items())), "samples": samples}
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


def apply(out_dir: Path, report: dict) -> None:
    """Moves each sample folder to samples/ (kept) or dropped/ (not), one rename each."""
    out_dir = Path(out_dir)
    for key, s in report["samples"].items():
        target, other = ("samples", "dropped") if s["kept"] else ("dropped", "samples")
        if (out_dir / other / key).is_dir():
            (out_dir / target).mkdir(exist_ok=True)
            os.replace(out_dir / other / key, out_dir / target / key)


def summary(report: dict) -> str:
    """One line: what the filter kept and dropped, per defect type."""
    rows = [f"{t} kept {r['kept']} of {r['pairs']} (control on the source: {r['found_on_source']} found)"
            for t, r in report["per_type"].items()]
    return "keep-recognisable: " + "; ".join(rows)
