"""Do generated masks look like the real ones? Shape statistics per defect type, real against generated.

    python -c "from defect_ds.evaluate.mask_stats import mask_shape; import numpy as np; \\
m = np.zeros((32, 32), np.uint8); m[10:12, 4:28] = 1; print(mask_shape(m))"

Per mask: its area (share of the image), its elongation (the square root of the ratio of the two
principal second moments of its pixels: 1 for a disc or a square, large for a scratch), its number of
connected components (8-connected, scipy.ndimage.label) and its position on the object (the mask's
centroid in the object's bounding box, 0..1 down and across; the object as `data/objects.py` finds it
in the source image when inpainting, else in the image). Per type and set: the mean and spread of each,
as a table in report.md and a picture.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from defect_ds.data.objects import object_region

STATS = ("area", "elongation", "components", "position_y", "position_x")


def mask_shape(mask: np.ndarray, region: np.ndarray | None = None) -> dict | None:
    """The statistics of one 0/1 mask (None when it is empty); `region` is the object (default: the image)."""
    from scipy import ndimage

    m = mask.astype(bool)
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    coords = np.stack([ys, xs]).astype(np.float64)
    cov = np.cov(coords) if len(ys) > 1 else np.zeros((2, 2))
    small, large = np.sort(np.linalg.eigvalsh(cov + np.eye(2) / 12))  # + a pixel's own spread (1/12)
    _, components = ndimage.label(m, structure=np.ones((3, 3)))
    if region is None or not region.any():
        region = np.ones_like(m)
    ry, rx = np.nonzero(region)
    top, left = ry.min(), rx.min()
    height, width = ry.max() - top + 1, rx.max() - left + 1
    return {"area": float(m.mean()), "elongation": float(np.sqrt(large / small)), "components": int(components),
            "position_y": float((ys.mean() + 0.5 - top) / height), "position_x": float((xs.mean() + 0.5 - left) / width)}


def sample_shape(sample: dict) -> dict | None:
    """A loaded sample's mask statistics, on the object of its source image (inpainting) or its image."""
    if sample.get("mask") is None:
        return None
    picture = sample["source"] if sample.get("source") is not None else sample["image"]
    return mask_shape(sample["mask"], object_region(picture))


def summarise(shapes: list[dict]) -> dict:
    """Mean and standard deviation of each statistic over masks, and how many there were."""
    out: dict = {"num_masks": len(shapes)}
    for name in STATS:
        values = np.array([s[name] for s in shapes], np.float64)
        out[f"{name}_mean"] = float(values.mean()) if len(values) else None
        out[f"{name}_std"] = float(values.std()) if len(values) else None
    return out


def compare_masks(generated: list[dict], real: list[dict], types: list[str]) -> dict:
    """{defect_type: {"generated": summary, "real": summary, "shapes": {...}}} over loaded samples
    (dicts with defect_type, mask, image, source); masks with no defect pixel are left out."""
    out = {}
    for t in types:
        entry = {}
        for side, items in (("generated", generated), ("real", real)):
            shapes = [s for s in (sample_shape(x) for x in items if x["defect_type"] == t) if s is not None]
            entry[side] = summarise(shapes)
            entry.setdefault("shapes", {})[side] = shapes
        out[t] = entry
    return out


def masks_markdown(comparison: dict) -> list[str]:
    """The report's mask table: one row per defect type and set, mean ± spread of each statistic."""
    lines = ["## Masks: generated against real", "",
             "| defect type | set | masks | area (% of image) | elongation | components | position on object ↓ "
             "| position on object → |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t, entry in comparison.items():
        for side in ("generated", "real"):
            s = entry[side]
            cells = [_pm(s, "area", 100), _pm(s, "elongation"), _pm(s, "components"), _pm(s, "position_y"),
                     _pm(s, "position_x")]
            lines.append(f"| {t} | {side} | {s['num_masks']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over the masks of each set. Elongation is the square root of the "
              "ratio of the principal second moments (1: round; large: a scratch); components are 8-connected; "
              "position is the mask's centroid in the object's bounding box (0 top/left, 1 bottom/right), the "
              "object found in the source image when inpainting, else in the image."]
    return lines


def save_mask_figure(comparison: dict, out_path: str | Path) -> Path | None:
    """One row per defect type: area, elongation and components as real-vs-generated box plots, and the
    positions on the object as a scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = [t for t, e in comparison.items() if e["shapes"]["generated"] or e["shapes"]["real"]]
    if not types:
        return None
    fig, axes = plt.subplots(len(types), 4, figsize=(13, 2.8 * len(types)), squeeze=False)
    colours = {"real": "tab:blue", "generated": "tab:red"}
    for row, t in zip(axes, types):
        shapes = comparison[t]["shapes"]
        for ax, name, scale in zip(row[:3], ("area", "elongation", "components"), (100, 1, 1)):
            data = [[s[name] * scale for s in shapes[side]] or [np.nan] for side in ("real", "generated")]
            ax.boxplot(data)
            ax.set_xticks([1, 2], ["real", "generated"])  # boxplot's own label keyword was renamed in 3.9
            ax.set_title(f"{t}: {name}{' (% of image)' if name == 'area' else ''}", fontsize=9)
        ax = row[3]
        for side in ("real", "generated"):
            ax.scatter([s["position_x"] for s in shapes[side]], [s["position_y"] for s in shapes[side]], s=12,
                       alpha=0.7, c=colours[side], label=side)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(1.05, -0.05)  # image coordinates: down is down
        ax.set_title(f"{t}: centroid on the object", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path


def _pm(summary: dict, name: str, scale: float = 1.0) -> str:
    mean, std = summary.get(f"{name}_mean"), summary.get(f"{name}_std")
    return "n/a" if mean is None else f"{mean * scale:.3g} ± {std * scale:.2g}"
