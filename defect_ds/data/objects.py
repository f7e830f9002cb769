"""Where the object is in an industrial photo: the pixels that differ from the plain background.

Shared by generation (masks are placed on the object) and evaluation (where masks lie on the object).

    python -c "from defect_ds.data.objects import centre_region; print(centre_region(8, 8).sum())"
"""
from __future__ import annotations

import numpy as np


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


def _erode(region: np.ndarray, pixels: int) -> np.ndarray:
    """Binary erosion by a (2p+1) square, in numpy (no scipy dependency)."""
    out = region.copy()
    padded = np.pad(region, pixels, constant_values=False)
    h, w = region.shape
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out
