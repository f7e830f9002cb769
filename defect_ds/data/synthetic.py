"""The embedded default data set: procedural industrial objects with scratches, cracks and spots.

Each defect is drawn as a boolean mask first and then rendered from the surface under it, only where the
mask is set, so the mask is pixel-exact by construction. The rule for soft edges: a defect's strength
may fall off inside its mask, but every mask pixel changes and no pixel outside the mask does (no
anti-aliasing, no halo). Everything is a function of (seed, category, defect type, index) and the
resolution: the same arguments give byte-identical samples.

Version 2 (SET_VERSION): objects vary in colour and finish (pills of six colours, screw heads of five
metals, surfaces of five finishes) and each defect varies within its type and takes its look from what it
lies on and a per-image light: a scratch is a specular line (brighter where the surface is dark or mid,
a darker groove on bright surfaces, strongest across the light), a spot a translucent stain that darkens
and tints the surface, a crack a dark core with a shadow on the side away from the light; width, length,
contrast and hue vary per sample. Version 1 painted each type in one flat colour, so copy-paste of the
shots was the set's own generating process; results measured on it say `synthetic v1`.

    defect-ds prepare synthetic work/data/synthetic/shards --resolution-px 128
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from defect_ds.data.captions import caption_for
from defect_ds.data.sample import GOOD, Sample

CATEGORIES = {"pill": "pill", "screw": "screw head", "surface": "textured surface"}  # name -> caption words
DEFECT_TYPES = ("scratch", "crack", "spot")
SET_VERSION = 2  # recorded in every sample; see the module docstring


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
    record = {"category": category, "defect_type": defect_type, "source": f"synthetic:v{SET_VERSION}:seed={seed}",
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
    light = rng.uniform(0, 2 * np.pi)  # the direction light comes from, per image
    for _ in range(20):  # a defect must touch the object; redraw the rare miss
        mask, render, detail = _draw_defect(defect_type, rng, size, region, light)
        mask &= region
        if mask.sum() >= 3:
            break
    else:
        raise RuntimeError(f"could not place a {defect_type} on a {category} at {size} px")
    under = base.astype(np.float32)
    painted = render(under, mask)
    # every mask pixel changes by at least 6 levels in some channel (the rule for soft edges)
    delta = painted - under
    weak = mask & (np.abs(delta).max(-1) < 6)
    push = np.where(under.mean(-1, keepdims=True) > 127, -6.0, 6.0)
    delta = np.where(weak[..., None], push, delta)
    image = np.where(mask[..., None], np.clip(np.rint(under + delta), 0, 255), under).astype(np.uint8)
    return image, mask, base, detail


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


PILL_COLOURS = ((206, 150, 70), (228, 226, 218), (78, 118, 196), (198, 88, 100), (222, 200, 88), (108, 168, 108))
METALS = ((172, 174, 178), (196, 166, 92), (186, 118, 80), (118, 116, 122), (150, 166, 196))  # steel, brass,
# copper, black oxide, blue zinc
FINISHES = ((128, 130, 134), (176, 178, 182), (84, 86, 96), (168, 138, 82), (98, 112, 132))  # brushed steel,
# aluminium, dark anodised, brass plate, painted blue-grey


def _pick(rng: np.random.Generator, palette: tuple, spread: float) -> np.ndarray:
    return np.array(palette[int(rng.integers(len(palette)))], np.float64) + rng.normal(0, spread, 3)


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
        colour = _pick(rng, PILL_COLOURS, 6)
        shade = 1.0 + 0.2 * np.exp(-(((y - cy + ry / 2) / ry) ** 2 + ((x - cx) / rx) ** 2) * 3)
        image = np.where(region[..., None], colour * shade[..., None] + noise, image)
    elif category == "screw":  # a round metal head with a cross slot
        cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
        r = rng.uniform(0.36, 0.42)
        dist = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        head = dist <= r
        metal = _pick(rng, METALS, 4) * (0.8 + 0.3 * (1 - dist / r))[..., None]
        slot_w = max(1.5 / size, 0.04)
        slot = head & ((np.abs(y - cy) < slot_w) | (np.abs(x - cx) < slot_w)) & (dist < 0.7 * r)
        image = np.where(head[..., None], metal + noise, image)
        image = np.where(slot[..., None], np.array([35, 35, 38]) + noise, image)
        region = head & ~slot
    elif category == "surface":  # brushed or painted metal: streaks along a random direction
        angle = rng.uniform(0, np.pi)
        u = x * np.cos(angle) + y * np.sin(angle)
        freq = rng.uniform(30, 60)
        amplitude = rng.uniform(5, 13)
        streaks = amplitude * np.sin(u * freq * np.pi + rng.uniform(0, 6)) + rng.normal(0, 5, (size, size))
        image = _pick(rng, FINISHES, 4) + streaks[..., None] + noise
        region = np.ones((size, size), bool)
    else:
        raise ValueError(f"Unknown synthetic category {category!r}; use one of {', '.join(CATEGORIES)}.")
    return np.clip(image, 0, 255).astype(np.uint8), region


def _bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def _stroke_width(rng: np.random.Generator, size: int) -> int:
    """1 px (two in three) or 2 px at 64 px, scaled with the image."""
    return max(1, round(size / 64 * (1 if rng.random() < 2 / 3 else 2)))


def _draw_defect(defect_type: str, rng: np.random.Generator, size: int, region: np.ndarray, light: float):
    """(mask bool HxW, render(under float HxWx3, mask) -> painted float HxWx3, caption detail)."""
    y0, y1, x0, x1 = _bbox(region)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)  # no anti-aliasing: a pixel is in the defect or not
    if defect_type == "scratch":
        orientation = str(rng.choice(["vertical", "horizontal", "diagonal"]))
        cy, cx = rng.uniform(y0 + 0.3 * (y1 - y0), y1 - 0.3 * (y1 - y0)), rng.uniform(
            x0 + 0.3 * (x1 - x0), x1 - 0.3 * (x1 - x0))
        half = rng.uniform(0.08, 0.3) * size
        dy, dx = {"vertical": (1, 0), "horizontal": (0, 1), "diagonal": (0.7, 0.7 * rng.choice([-1, 1]))}[
            orientation]
        draw.line([(cx - dx * half, cy - dy * half), (cx + dx * half, cy + dy * half)], fill=255,
                  width=_stroke_width(rng, size))
        # a groove catches the light most when it runs across the light's direction
        across = abs(np.cos(light) * dy - np.sin(light) * dx) / np.hypot(dx, dy)
        strength = rng.uniform(0.3, 0.85) * (0.45 + 0.55 * across)
        tint = np.array([255, 250, 236]) if rng.random() < 0.5 else np.array([236, 244, 255])
        return np.asarray(canvas) > 0, lambda under, mask: _specular(under, strength, tint, rng), orientation
    if defect_type == "crack":  # a jagged random walk with a shadow on the side away from the light
        py, px = rng.uniform(y0 + 0.25 * (y1 - y0), y1 - 0.25 * (y1 - y0)), rng.uniform(
            x0 + 0.25 * (x1 - x0), x1 - 0.25 * (x1 - x0))
        heading = rng.uniform(0, 2 * np.pi)
        points = [(px, py)]
        for _ in range(int(rng.integers(3, 9))):
            heading += rng.normal(0, 0.7)
            step = rng.uniform(0.03, 0.08) * size
            px, py = px + step * np.cos(heading), py + step * np.sin(heading)
            points.append((px, py))
        draw.line(points, fill=255, width=_stroke_width(rng, size))
        core = np.asarray(canvas) > 0
        sy, sx = int(round(-np.sin(light))), int(round(-np.cos(light)))
        shadow = _shift(core, sy, sx) & ~core
        depth = rng.uniform(0.15, 0.5)  # the core keeps this share of the surface's light
        shade = 1 - 0.5 * (1 - depth)
        factor = np.where(core, depth, shade)[..., None]
        return core | shadow, lambda under, mask: under * factor, "a"
    if defect_type == "spot":  # a translucent stain of overlapping ellipses
        cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
        scale = rng.uniform(0.025, 0.085) * size
        for _ in range(int(rng.integers(2, 5))):
            oy, ox = rng.normal(0, scale * 0.6, 2)
            ry, rx = rng.uniform(0.5, 1.0, 2) * scale
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
        stain = _pick(rng, ((96, 62, 28), (150, 72, 38), (44, 44, 50), (78, 96, 52), (60, 66, 120)), 6) / 255
        opacity = rng.uniform(0.4, 0.85)
        detail = "a large" if scale > 0.055 * size else "a small"
        return np.asarray(canvas) > 0, lambda under, mask: _stain(under, stain, opacity, rng), detail
    raise ValueError(f"Unknown synthetic defect type {defect_type!r}; use one of {', '.join(DEFECT_TYPES)}.")


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """mask moved by (dy, dx) pixels, without wrapping around the border."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = mask[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _specular(under: np.ndarray, strength: float, tint: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brighter towards the light's colour where the surface is dark or mid; a darker groove where it is bright."""
    grain = 1 + rng.normal(0, 0.08, under.shape[:2] + (1,))
    bright = under.mean(-1, keepdims=True) > 190
    return np.where(bright, under * (1 - 0.45 * strength * grain), under + strength * grain * (tint - under))


def _stain(under: np.ndarray, stain: np.ndarray, opacity: float, rng: np.random.Generator) -> np.ndarray:
    """A translucent stain: multiplies what is under it by the stain's colour, more in some places."""
    alpha = np.clip(opacity + rng.normal(0, 0.06, under.shape[:2] + (1,)), 0.3, 0.95)
    return under * (1 - alpha) + under * stain * alpha
