"""Random defect masks drawn procedurally: strokes (scratches, cracks) and blobs (stains, dents).

Masks are sized relative to the object and placed on it: the object is estimated from the image as
the pixels that differ from the border colour (industrial photos have a plain background; see
`data/objects.py`, which evaluation shares), and the drawn shape is clipped to it. Real masks of the
few shots can be augmented and placed on the object the same way (`augment_mask`, `place_on_object`).
Everything is seeded, so a sample key always gets the same mask. `overlay_mask` outlines a mask on its
image for the grids of training, generation and evaluation.

    python -c "from defect_ds.data.masks import random_mask; import numpy as np; \
print(random_mask(64, 64, np.random.default_rng(0)).sum())"
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from defect_ds.data.objects import centre_region

KINDS = ("stroke", "blob", "mixed")
_SUPERSAMPLE = 4  # augmented masks are transformed at 4x and area-averaged back
_COVERAGE = 0.4  # share of a pixel the transformed shape must cover to be defect
OVERLAY_RGB = (255, 40, 40)  # mask outlines in sample grids


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


# ---- real masks, augmented and placed on the object --------------------------------------------

def augment_mask(mask: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float] = (0.75, 1.25),
                 elastic_strength: tuple[float, float] = (0.3, 0.8)) -> tuple[np.ndarray, dict]:
    """A real defect's shape, randomly rotated, scaled, flipped and elastically deformed, cropped to its
    bounding box: (uint8 0/1 patch, the parameters drawn). Every draw comes from `rng`, so a sample key
    always gets the same shape; the parameters are returned to be recorded with the sample.

    torchvision's own transforms do the work, on the shape supersampled 4x and bilinear, then
    area-averaged back and thresholded, so edges stay smooth, a 1-px scratch stays connected and the
    result is exactly 0/1. The elastic displacement is drawn by `ElasticTransform` from torch's
    generator, forked and seeded from `rng`.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.v2 import ElasticTransform, InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    patch = _crop_to_defect(mask)
    params = {"angle_deg": float(rng.uniform(0, 360)), "scale": float(rng.uniform(*scale_range)),
              "hflip": bool(rng.integers(2)), "vflip": bool(rng.integers(2)),
              "elastic_seed": int(rng.integers(2**31)), "elastic_strength": float(rng.uniform(*elastic_strength))}
    h, w = patch.shape
    # a canvas that holds the shape whatever the rotation and scale, plus room to deform
    side = max(int(math.ceil(math.hypot(h, w) * max(params["scale"], 1.0) * 1.2)), h, w) + 4
    canvas = np.zeros((side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = patch
    x = torch.from_numpy(canvas)[None, None].repeat_interleave(_SUPERSAMPLE, -1).repeat_interleave(_SUPERSAMPLE, -2)
    if params["hflip"]:
        x = TF.horizontal_flip(x)
    if params["vflip"]:
        x = TF.vertical_flip(x)
    x = TF.affine(x, angle=params["angle_deg"], translate=[0.0, 0.0], scale=params["scale"], shear=[0.0, 0.0],
                  interpolation=InterpolationMode.BILINEAR)
    sigma = 0.12 * side  # smooth: the shape bends, its edge does not fray
    params.update(elastic_sigma_px=round(sigma, 3), elastic_alpha=params["elastic_strength"] * side * sigma)
    elastic = ElasticTransform(alpha=params["elastic_alpha"], sigma=sigma, interpolation=InterpolationMode.BILINEAR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params["elastic_seed"])
        # drawn at the mask's own size (blurring the 4x grid is slow), in normalised units, so the
        # same field upsampled moves the supersampled shape by the same amount
        field = elastic.make_params([torch.zeros(1, side, side)])["displacement"]
    field = F.interpolate(field.permute(0, 3, 1, 2), size=x.shape[-2:], mode="bilinear", align_corners=False)
    deformed = TF.elastic(x, field.permute(0, 2, 3, 1), interpolation=InterpolationMode.BILINEAR)

    def binary(t: torch.Tensor) -> np.ndarray:
        return (F.avg_pool2d(t, _SUPERSAMPLE)[0, 0].numpy() >= _COVERAGE).astype(np.uint8)

    out = binary(deformed)
    if not out.any():  # deformed to nothing: the rotated, scaled shape instead
        out = binary(x)
        params["elastic_skipped"] = True
    if not out.any():
        out = patch.copy()
        params["affine_skipped"] = True
    return _crop_to_defect(out), params


def place_on_object(patch: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The patch (uint8 0/1, cropped to its defect) put at a random position where every defect pixel
    lies on `region`; shrunk (nearest) until it fits. Returns the (H, W) uint8 mask and where it went."""
    from scipy.signal import fftconvolve

    if not region.any():
        raise ValueError("The object region must be non-empty.")
    ys, xs = np.nonzero(region)
    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    shrink = min(1.0, box_h / patch.shape[0], box_w / patch.shape[1])
    outside = (~region).astype(np.float32)
    for attempt in range(12):
        shape = patch if shrink >= 1.0 else _resize_binary(patch, shrink)
        ph, pw = shape.shape
        if ph <= region.shape[0] and pw <= region.shape[1]:
            # pixels of the shape that would fall off the object, for every top-left position
            spill = fftconvolve(outside, shape[::-1, ::-1].astype(np.float32), mode="valid")
            ok = np.argwhere(spill < 0.5)
            if len(ok):
                top, left = (int(v) for v in ok[int(rng.integers(len(ok)))])
                out = np.zeros(region.shape, np.uint8)
                out[top:top + ph, left:left + pw] = shape
                out &= region.astype(np.uint8)  # exact already; guards against fft rounding
                if out.any():
                    return out, {"offset_yx": [top, left], "placed_scale": round(float(shrink), 4)}
        shrink *= 0.75
    out = np.zeros(region.shape, np.uint8)  # a region too thin for any shape: one region pixel
    i = int(rng.integers(len(ys)))
    out[ys[i], xs[i]] = 1
    return out, {"offset_yx": [int(ys[i]), int(xs[i])], "placed_scale": 0.0}


def _crop_to_defect(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("A mask with no defect pixel has no shape to augment.")
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8)


def _resize_binary(patch: np.ndarray, factor: float) -> np.ndarray:
    """Nearest resize by `factor`, then cropped to the defect; a shape that vanishes keeps one pixel."""
    h, w = patch.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    out = (np.asarray(Image.fromarray(patch * 255).resize(size, Image.NEAREST)) > 127).astype(np.uint8)
    return _crop_to_defect(out) if out.any() else np.ones((1, 1), np.uint8)


def overlay_mask(image: np.ndarray, mask: np.ndarray, cell_px: int = 128) -> np.ndarray:
    """The image enlarged a whole number of times towards `cell_px` (nearest; never shrunk) with the
    mask's outline drawn in red just outside it (uint8). Pixels inside the mask are left as they are, so
    a defect one pixel wide stays visible inside its outline, and the outline is thin beside it."""
    scale = max(1, cell_px // image.shape[0])
    m = np.kron(mask.astype(bool), np.ones((scale, scale), bool))
    out = np.kron(image, np.ones((scale, scale, 1), image.dtype)) if scale > 1 else image.copy()
    padded = np.pad(m, 1, constant_values=False)
    grown = m.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        grown |= padded[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    out[grown & ~m] = OVERLAY_RGB
    return out.astype(np.uint8)
