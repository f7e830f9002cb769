"""Diversity beyond the shots: how far is each generated defect from the nearest shot of its type?

    python benchmarks/diversity.py work/downstream/shots work/generated --reference work/val/split/test

Each defect pair (image + mask) is described two ways: its patch (the mask's bounding box, padded by 2
pixels, resized to 24x24, RGB) and its look (the mean colour inside the mask and in a 2-pixel ring around
it). For every generated defect, the distance to the nearest shot of its type (mean absolute difference,
0-255) says whether it is a shot re-drawn (near 0) or something new. The same distance for REFERENCE's
defects (real defects the shots do not hold: a validation set, never the test set one tunes on) is the
diversity real defects have; the shots' own leave-one-out distance is their spread. Reported per type:
the median of each, and generated / reference (1: as varied as real unseen defects; below 1: closer to
the shots than real ones are). Far from the shots is not yet good: fidelity is each generated defect's
distance to the nearest REFERENCE defect, beside the reference defects' own leave-one-out distance (a
generated defect like some real one sits as close as real ones sit to each other).
Writes diversity-DATE[-TAG].{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defect_ds.downstream.arms import Pairs
from defect_ds.downstream.cli import environment, load_pairs

PATCH = 24
PAD = 2


def describe(pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """(N, 24*24*3) patches and (N, 6) looks of the defect pairs, float32 on the 0-255 scale."""
    patches, looks = [], []
    for image, mask in zip(pairs.images, pairs.masks):
        inside = mask.astype(bool)
        ys, xs = np.nonzero(inside)
        h, w = inside.shape
        y0, y1 = max(ys.min() - PAD, 0), min(ys.max() + PAD + 1, h)
        x0, x1 = max(xs.min() - PAD, 0), min(xs.max() + PAD + 1, w)
        crop = Image.fromarray(image[y0:y1, x0:x1]).resize((PATCH, PATCH), Image.BILINEAR)
        patches.append(np.asarray(crop, np.float32).reshape(-1))
        ring = ndimage.binary_dilation(inside, iterations=2) & ~inside
        around = image[ring].mean(axis=0) if ring.any() else image[inside].mean(axis=0)
        looks.append(np.concatenate([image[inside].mean(axis=0), around]).astype(np.float32))
    return np.array(patches).reshape(len(patches), -1), np.array(looks).reshape(len(looks), -1)


def nearest(queries: np.ndarray, shots: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
    """Each query's mean absolute difference to its nearest shot (itself excluded when leave_one_out)."""
    d = np.abs(queries[:, None, :] - shots[None, :, :]).mean(axis=-1)
    if leave_one_out:
        np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def measure(shots: Pairs, generated: Pairs, reference: Pairs) -> dict:
    out = {}
    described = {name: (describe(p), np.array(p.types)) for name, p in
                 (("shots", shots), ("generated", generated), ("reference", reference))}
    for t in sorted(set(generated.types)):
        (shot_patch, shot_look), shot_types = described["shots"]
        keep = shot_types == t
        if not keep.any():
            continue
        row = {"shots": int(keep.sum())}
        for k, name in enumerate(("patch", "look")):
            shot_desc = (shot_patch, shot_look)[k][keep]
            med = {"shots_leave_one_out": float(np.median(nearest(shot_desc, shot_desc, leave_one_out=True)))
                   if len(shot_desc) > 1 else None}
            for side in ("generated", "reference"):
                (patch, look), types = described[side]
                sel = types == t
                med[side] = float(np.median(nearest((patch, look)[k][sel], shot_desc))) if sel.any() else None
                row[f"{side}_pairs"] = int(sel.sum())
            (ref_patch, ref_look), ref_types = described["reference"]
            ref_desc = (ref_patch, ref_look)[k][ref_types == t]
            (gen_patch, gen_look), gen_types = described["generated"]
            if len(ref_desc) > 1:
                med["reference_to_reference"] = float(np.median(nearest(ref_desc, ref_desc, leave_one_out=True)))
                med["generated_to_reference"] = float(np.median(nearest((gen_patch, gen_look)[k][gen_types == t],
                                                                        ref_desc)))
            ref = med["reference"]
            med["generated_over_reference"] = (round(med["generated"] / ref, 3) if ref else None)
            row[name] = {k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in med.items()}
        out[t] = row
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shots", help="the shots (a shards folder)")
    p.add_argument("generated", help="a `defect-ds generate` output folder")
    p.add_argument("--reference", required=True,
                   help="real defects the shots do not hold, e.g. a validation split's test side (not the test set)")
    p.add_argument("--resolution-px", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    size = args.resolution_px
    shots, generated = load_pairs(args.shots, size, defects=True), load_pairs(args.generated, size, defects=True)
    reference = load_pairs(args.reference, size, defects=True)
    if not len(generated) or not len(shots) or not len(reference):
        raise SystemExit(f"Need defect pairs in {args.shots} ({len(shots)}), {args.generated} ({len(generated)}) "
                         f"and {args.reference} ({len(reference)}).")
    per_type = measure(shots, generated, reference)
    results = {"shots": args.shots, "generated": args.generated, "reference": args.reference, "resolution_px": size,
               "per_type": per_type, "environment": environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"diversity-{datetime.date.today().isoformat()}{'-' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["# Diversity beyond the shots: distance of each defect to the nearest shot of its type", "",
             f"Shots `{args.shots}`, generated `{args.generated}`, reference (real defects the shots do not hold) "
             f"`{args.reference}`; {size} px. Median over each set's defects of the mean absolute difference (0-255) "
             "to the nearest shot; patch: the mask's padded bounding box at 24x24; look: the mean colour inside "
             "the mask and in a 2-pixel ring around it.", "",
             f"Device: {results['environment']['device']} (the measure trains nothing); "
             f"reference: {len(reference)} defect images.", "",
             "| type | description | shots, leave one out | generated | reference | generated / reference | "
             "fidelity: generated to nearest reference | reference, leave one out |",
             "|---|---|---|---|---|---|---|---|"]
    for t, row in per_type.items():
        for name in ("patch", "look"):
            r = row[name]
            cells = [r[k] if r[k] is None else format(r[k], ".1f") for k in ("shots_leave_one_out", "generated", "reference")]
            fid = [format(r[k], ".1f") if r.get(k) is not None else "-"
                   for k in ("generated_to_reference", "reference_to_reference")]
            lines.append(f"| {t} | {name} | {' | '.join(map(str, cells))} | {r['generated_over_reference']} | "
                         f"{' | '.join(fid)} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
