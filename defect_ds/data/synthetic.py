"""The embedded default data set: procedural industrial objects with scratches, cracks and spots.

Each defect is drawn as a boolean mask first and then painted into the image only where the mask is
set, so the mask is pixel-exact by construction. Everything is a function of (seed, category, defect
type, index) and the resolution: the same arguments give byte-identical samples.

    defect-ds prepare synthetic work/data/synthetic/shards --resolution-px 128
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from defect_ds.data.captions import caption_for
from defect_ds.data.sample import GOOD, Sample

CATEGORIES = {"pill": "pill", "screw": "screw head", "surface": "textured surface"}  # name -> caption words
DEFECT_TYPES = ("scratch", "crack", "spot")


def plan(*, per_defect: int, good_per_category: int,
         categories: tuple[str, ...] = tuple(CATEGORIES)) -> list[tuple[str, str, int]]:
    """(category, defect type, index) of every sample: per_defect of each defect type and
    good_per_category defect-free ones per category."""
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"Unknown synthetic categories {', '.join(unknown)}; use some of {', '.join(CATEGORIES)}.")
    return [(category, defect_type, i) for category in categories for defect_type in (GOOD, *DEFECT_TYPES)
            for i in range(good_per_category if defect_type == GOOD else per_defect)]


def sample_key(category: str, defect_type: str, index: int) -> str:
    return f"synthetic-{category}-{defect_type}-{index:04d}"


def make_sample(category: str, defect_type: str, index: int, *, resolution_px: int, seed: int,
                tokens: dict[str, str], templates: dict[str, str] | None = None) -> Sample:
    """One sample, a pure function of its arguments."""
    c, d = list(CATEGORIES).index(category), (GOOD, *DEFECT_TYPES).index(defect_type)
    rng = np.random.default_rng([seed, c, d, index])
    image, mask, _, detail = draw_sample(category, defect_type, rng, resolution_px)
    caption = caption_for(CATEGORIES[category], defect_type, tokens, templates, detail)
    record = {"category": category, "defect_type": defect_type, "source": f"synthetic:seed={seed}",
              "detail": detail}
    return Sample(sample_key(category, defect_type, index), Image.fromarray(image),
                  Image.fromarray(mask.astype(np.uint8) * 255), caption, record)


def draw_sample(category: str, defect_type: str, rng: np.random.Generator, size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Returns (image uint8 HxWx3, defect mask bool HxW, defect-free image, caption detail)."""
    if size < 16:
        raise ValueError(f"--resolution-px={size} is too small to draw defects on; use 16 or more.")
    base, region = _draw_object(category, rng, size)
    if defect_type == GOOD:
        return base, np.zeros((size, size), bool), base, ""
    for _ in range(20):  # a defect must touch the object; redraw the rare miss
        mask, colour, detail = _draw_defect(defect_type, rng, size, region)
        mask &= region
        if mask.sum() >= 3:
            break
    else:
        raise RuntimeError(f"could not place a {defect_type} on a {category} at {size} px")
    image = base.copy()
    image[mask] = colour(mask.sum())
    return image, mask, base, detail


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


def _draw_object(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free object and the region (bool) where defects may appear."""
    y, x = _grid(size)
    noise = rng.normal(0, 4, (size, size, 1))
    background = np.array([52, 54, 60]) + rng.normal(0, 3, 3)
    image = np.broadcast_to(background, (size, size, 3)) + noise
    if category == "pill":  # an elongated capsule with a soft highlight
        cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
        ry, rx = rng.uniform(0.18, 0.24), rng.uniform(0.36, 0.42)
        region = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        colour = np.array([206, 150, 70]) + rng.normal(0, 8, 3)
        shade = 1.0 + 0.25 * np.exp(-(((y - cy + ry / 2) / ry) ** 2 + ((x - cx) / rx) ** 2) * 3)
        image = np.where(region[..., None], colour * shade[..., None] + noise, image)
    elif category == "screw":  # a round metal head with a cross slot
        cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
        r = rng.uniform(0.36, 0.42)
        dist = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        head = dist <= r
        metal = 150 + 60 * (1 - dist / r) + rng.normal(0, 3)
        slot_w = max(1.5 / size, 0.04)
        slot = head & ((np.abs(y - cy) < slot_w) | (np.abs(x - cx) < slot_w)) & (dist < 0.7 * r)
        image = np.where(head[..., None], metal[..., None] + noise, image)
        image = np.where(slot[..., None], np.array([35, 35, 38]) + noise, image)
        region = head & ~slot
    elif category == "surface":  # brushed metal: streaks along a random direction
        angle = rng.uniform(0, np.pi)
        u = x * np.cos(angle) + y * np.sin(angle)
        freq = rng.uniform(30, 60)
        streaks = 12 * np.sin(u * freq * np.pi + rng.uniform(0, 6)) + rng.normal(0, 6, (size, size))
        image = (np.array([128, 130, 134]) + streaks[..., None]) + noise
        region = np.ones((size, size), bool)
    else:
        raise ValueError(f"Unknown synthetic category {category!r}; use one of {', '.join(CATEGORIES)}.")
    return np.clip(image, 0, 255).astype(np.uint8), region


def _bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def _draw_defect(defect_type: str, rng: np.random.Generator, size: int, region: np.ndarray):
    """(mask bool HxW, colour(n) -> n x 3 values, caption detail)."""
    y0, y1, x0, x1 = _bbox(region)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)  # no anti-aliasing: a pixel is in the defect or not
    if defect_type == "scratch":
        orientation = rng.choice(["vertical", "horizontal", "diagonal"])
        cy, cx = rng.uniform(y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0)), rng.uniform(
            x0 + 0.3 * (x1 - x0), x1 - 0.3 * (x1 - x0))
        half = rng.uniform(0.15, 0.3) * size
        dy, dx = {"vertical": (1, 0), "horizontal": (0, 1), "diagonal": (0.7, 0.7 * rng.choice([-1, 1]))}[
            orientation]
        draw.line([(cx - dx * half, cy - dy * half), (cx + dx * half, cy + dy * half)], fill=255,
                  width=max(1, size // 64))
        return np.asarray(canvas) > 0, lambda n: _jitter(rng, (238, 238, 244), n, 6), str(orientation)
    if defect_type == "crack":  # a jagged random walk
        py, px = rng.uniform(y0 + 0.25 * (y1 - y0), y1 - 0.25 * (y1 - y0)), rng.uniform(
            x0 + 0.25 * (x1 - x0), x1 - 0.25 * (x1 - x0))
        heading = rng.uniform(0, 2 * np.pi)
        points = [(px, py)]
        for _ in range(int(rng.integers(5, 9))):
            heading += rng.normal(0, 0.7)
            step = rng.uniform(0.04, 0.08) * size
            px, py = px + step * np.cos(heading), py + step * np.sin(heading)
            points.append((px, py))
        draw.line(points, fill=255, width=max(1, size // 96))
        return np.asarray(canvas) > 0, lambda n: _jitter(rng, (20, 18, 18), n, 5), "a"
    if defect_type == "spot":  # contamination: a blob of overlapping ellipses
        cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
        scale = rng.uniform(0.03, 0.08) * size
        for _ in range(int(rng.integers(2, 5))):
            oy, ox = rng.normal(0, scale * 0.6, 2)
            ry, rx = rng.uniform(0.5, 1.0, 2) * scale
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
        detail = "a large dark" if scale > 0.055 * size else "a small dark"
        return np.asarray(canvas) > 0, lambda n: _jitter(rng, (74, 50, 26), n, 8), detail
    raise ValueError(f"Unknown synthetic defect type {defect_type!r}; use one of {', '.join(DEFECT_TYPES)}.")


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], n: int, spread: float) -> np.ndarray:
    return np.clip(np.array(colour) + rng.normal(0, spread, (n, 1)), 0, 255).astype(np.uint8)
