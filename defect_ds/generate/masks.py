"""Random defect masks drawn procedurally: strokes (scratches, cracks) and blobs (stains, dents).

Masks are sized relative to the object and placed on it: the object is estimated from the image as
the pixels that differ from the border colour (industrial photos have a plain background), and the
drawn shape is clipped to it. Everything is seeded, so a sample key always gets the same mask.

    python -c "from defect_ds.generate.masks import random_mask; import numpy as np; \
print(random_mask(64, 64, np.random.default_rng(0)).sum())"
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("stroke", "blob", "mixed")


def object_region(image: np.ndarray, threshold: int = 24, min_fraction: float = 0.05,
                  margin_fraction: float = 0.125) -> np.ndarray:
    """A bool (H, W) estimate of where the object is in an RGB uint8 image.

    Pixels whose colour differs from the median border colour by more than `threshold` (any
    channel) count as object. When that finds less than `min_fraction` of the image (a textured
    surface filling the frame, or a flat image) the whole image minus a margin is used instead.
    """
    h, w = image.shape[:2]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.int16)
    background = np.median(border, axis=0)
    region = (np.abs(image.astype(np.int16) - background).max(axis=-1) > threshold)
    region = _erode(region, max(1, round(min(h, w) * 0.02)))  # keep defects off the object's edge
    if region.mean() < min_fraction:
        return centre_region(h, w, margin_fraction)
    return region


def centre_region(height: int, width: int, margin_fraction: float = 0.125) -> np.ndarray:
    """The whole image minus a margin on every side, as a bool (H, W) array."""
    region = np.zeros((height, width), bool)
    my, mx = round(height * margin_fraction), round(width * margin_fraction)
    region[my:height - my, mx:width - mx] = True
    return region


def random_mask(height: int, width: int, rng: np.random.Generator, region: np.ndarray | None = None,
                kind: str = "mixed", size_range: tuple[float, float] = (0.15, 0.4)) -> np.ndarray:
    """A uint8 (H, W) 0/1 mask with one random stroke or blob inside `region`.

    `size_range` is the defect's extent as a fraction of the region's bounding box side: a stroke's
    length, a blob's diameter. `region` defaults to the image minus a 12.5% margin.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown procedural mask kind {kind!r}: use one of {', '.join(KINDS)}.")
    if region is None:
        region = centre_region(height, width)
    if region.shape != (height, width) or not region.any():
        raise ValueError("The object region must be a non-empty (height, width) array.")
    ys, xs = np.nonzero(region)
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    for _ in range(20):
        k = kind if kind != "mixed" else ("stroke", "blob")[int(rng.integers(2))]
        i = int(rng.integers(len(ys)))
        centre = (float(xs[i]), float(ys[i]))
        extent = side * rng.uniform(*size_range)
        canvas = Image.new("L", (width, height), 0)
        if k == "stroke":
            _draw_stroke(ImageDraw.Draw(canvas), centre, extent, side, rng)
        else:
            _draw_blob(ImageDraw.Draw(canvas), centre, extent, rng)
        mask = (np.asarray(canvas) > 0) & region
        if mask.sum() >= max(4, 0.002 * height * width):  # too small to see: draw again
            return mask.astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)  # a small disc at a region pixel, always non-empty
    r = max(1, side // 16)
    yy, xx = np.ogrid[:height, :width]
    mask[((yy - ys[0]) ** 2 + (xx - xs[0]) ** 2 <= r * r) & region] = 1
    return mask


def _draw_stroke(draw: ImageDraw.ImageDraw, centre: tuple[float, float], length: float, side: int,
                 rng: np.random.Generator) -> None:
    """A slightly bending polyline through `centre`, like a scratch or a crack."""
    segments = int(rng.integers(2, 5))
    angle = rng.uniform(0, math.pi)
    step = length / segments
    x, y = centre[0] - math.cos(angle) * length / 2, centre[1] - math.sin(angle) * length / 2
    points = [(x, y)]
    for _ in range(segments):
        angle += rng.normal(0, 0.35)
        x, y = x + math.cos(angle) * step, y + math.sin(angle) * step
        points.append((x, y))
    width = max(1, round(side * rng.uniform(0.02, 0.05)))
    draw.line(points, fill=255, width=width, joint="curve")


def _draw_blob(draw: ImageDraw.ImageDraw, centre: tuple[float, float], diameter: float,
               rng: np.random.Generator) -> None:
    """A union of a few overlapping ellipses around `centre`, like a stain or a dent."""
    radius = max(1.0, diameter / 2)
    for _ in range(int(rng.integers(3, 7))):
        cx = centre[0] + rng.normal(0, radius * 0.35)
        cy = centre[1] + rng.normal(0, radius * 0.35)
        rx, ry = radius * rng.uniform(0.4, 0.8), radius * rng.uniform(0.4, 0.8)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)


def _erode(region: np.ndarray, pixels: int) -> np.ndarray:
    """Binary erosion by a (2p+1) square, in numpy (no scipy dependency)."""
    out = region.copy()
    padded = np.pad(region, pixels, constant_values=False)
    h, w = region.shape
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out
