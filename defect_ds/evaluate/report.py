"""Pictures and a short markdown report: sample grids with mask overlays, and the metric table.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from defect_ds.data.masks import overlay_mask
from defect_ds.data.sample import mask_array
from defect_ds.evaluate.mask_stats import masks_markdown
from defect_ds.utils.files import atomic_file


def make_grid(rows: list[tuple[str, list[np.ndarray]]], cell_px: int = 128, pad_px: int = 2,
              label_px: int = 14) -> Image.Image:
    """Rows of equally sized cells, each row titled with its label."""
    ncols = max((len(cells) for _, cells in rows), default=1)
    row_h = label_px + cell_px + pad_px
    grid = Image.new("RGB", (ncols * (cell_px + pad_px) + pad_px, len(rows) * row_h + pad_px), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, cells) in enumerate(rows):
        top = pad_px + r * row_h
        draw.text((pad_px, top), label, fill=(0, 0, 0))
        for c, cell in enumerate(cells):
            tile = Image.fromarray(cell).resize((cell_px, cell_px), Image.NEAREST)
            grid.paste(tile, (pad_px + c * (cell_px + pad_px), top + label_px))
    return grid


def save_sample_grid(samples_dir: str | Path, out_path: str | Path, per_row: int = 8,
                     with_source: bool = True) -> Path | None:
    """A PNG grid of a generated samples/ folder: one row per defect type, masks overlaid in red.

    Inpainted samples get a second row per type with their source images, to compare side by side.
    """
    samples_dir, out_path = Path(samples_dir), Path(out_path)
    by_type: dict[str, list[Path]] = {}
    for meta_file in sorted(samples_dir.glob("*/json")):
        defect_type = json.loads(meta_file.read_text()).get("defect_type", "?")
        by_type.setdefault(defect_type, []).append(meta_file.parent)
    if not by_type:
        return None
    rows = []
    for defect_type, folders in sorted(by_type.items()):
        folders = folders[:per_row]
        cells = [overlay_mask(_rgb(f / "image.png"), _mask(f / "mask.png")) for f in folders]
        rows.append((f"{defect_type} (mask outlined in red)", cells))
        if with_source and all((f / "source.png").is_file() for f in folders):
            rows.append((f"{defect_type}: source images", [_rgb(f / "source.png") for f in folders]))
    cell = max(128, min(256, _rgb(folders[0] / "image.png").shape[0]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(rows, cell_px=cell), out_path)
    return out_path


def save_pair_grid(rows: list[tuple[str, list[tuple[np.ndarray, np.ndarray | None]]]], out_path: str | Path,
                   cell_px: int = 128) -> Path:
    """Rows of (image, mask or None) pairs, masks overlaid: e.g. real next to generated per defect type."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid_rows = [(label, [overlay_mask(img, m, cell_px) if m is not None else img for img, m in cells])
                 for label, cells in rows]
    save_png(make_grid(grid_rows, cell_px=cell_px), out_path)
    return out_path


def save_png(image: Image.Image, path: Path) -> None:
    """A picture of the results, written atomically like the results themselves."""
    with atomic_file(path, "wb") as f:
        image.save(f, format="PNG")


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _mask(path: Path) -> np.ndarray:
    return mask_array(Image.open(path)).astype(np.uint8)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _pm(metrics: dict, name: str) -> str:
    mean, std = metrics.get(f"{name}_mean"), metrics.get(f"{name}_std")
    return "n/a" if mean is None else f"{_fmt(mean)} ± {_fmt(std)}"


def markdown_report(report: dict, grid_files: list[str]) -> str:
    """The evaluation report as short markdown: settings, the metric table, notes, the grids."""
    lines = ["# Generation evaluation", "",
             f"Generated: `{report['generated']}`  ", f"Real: `{report['real']}`  ",
             f"Inception weights: `{report.get('inception_weights', 'n/a')}`", "",
             "| defect type | generated | real | FID ↓ | KID ↓ | IS ↑ | mask localisation ↑ "
             "| mask localisation before composite ↑ | IC-LPIPS ↑ | masked pixel diversity |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    groups = dict(report["per_defect_type"])
    groups["**overall**"] = report["overall"]
    for name, m in groups.items():
        lines.append(f"| {name} | {m.get('num_generated', 0)} | {m.get('num_real', 0)} | {_fmt(m.get('fid'))} "
                     f"| {_pm(m, 'kid')} | {_pm(m, 'is')} | {_fmt(m.get('mask_localisation'))} "
                     f"| {_fmt(m.get('mask_localisation_before_composite'))} "
                     f"| {_fmt(m.get('ic_lpips'))} | {_fmt(m.get('masked_pixel_diversity'))} |")
    lines += ["", "FID and KID compare generated with real images of the same defect type (lower is closer); "
              "IS is over the generated images only. Mask localisation is the share of the change from the "
              "source image that lies inside the mask (inpainting): after compositing it is 1.0 by "
              "construction; before compositing it is how well the model alone kept to the mask. "
              "IC-LPIPS is intra-cluster LPIPS diversity; masked pixel diversity is the mean absolute pixel "
              "difference inside the masks between pairs of generated images of one type (0..1), a cheap "
              "stand-in that is not LPIPS."]
    # the per-group notes (lowered KID subsets, biased FID) qualify the numbers above, so they go here too
    notes = list(report.get("notes", []))
    for name, m in groups.items():
        notes += [f"{name.strip('*')}: {n}" for n in m.get("notes", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if report.get("masks"):
        lines += [""] + masks_markdown(report["masks"])
    for g in grid_files:
        lines += ["", f"![{Path(g).stem}]({Path(g).name})"]
    return "\n".join(lines) + "\n"
