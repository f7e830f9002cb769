"""What each arm trains the segmenter on: the shots, copy-paste of the shots, generated pairs, or both.

    python -c "from defect_ds.downstream.arms import ARMS; print(ARMS)"

Every arm's samples go through the same flips and small affine jitter (the segmenter applies it to the
whole batch, `segmenter.jitter_batch`), so the arms differ only in where their defects come from. The
mixed arms (`real+generated`, `copy-paste+generated`) draw each defect sample from either source with
probability one half.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defect_ds.data.objects import object_region

ARMS = ("real", "copy-paste", "generated", "real+generated", "copy-paste+generated")


@dataclass
class Pairs:
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # uint8 0/1 (N, H, W)
    types: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)


def paste(shot: np.ndarray, shot_mask: np.ndarray, good: np.ndarray, region: np.ndarray,
          rng: np.random.Generator, tries: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """The shot's defect pixels, rotated by a multiple of 90 degrees and flipped, pasted onto `good` at a
    random place where the whole defect lies on the object (`region`); the classic copy-paste baseline."""
    k = int(rng.integers(4))
    patch, patch_mask = np.rot90(shot, k), np.rot90(shot_mask, k)
    if rng.random() < 0.5:
        patch, patch_mask = patch[:, ::-1], patch_mask[:, ::-1]
    ys, xs = np.nonzero(patch_mask)
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    size = good.shape[0]
    best, best_inside = None, -1.0
    for _ in range(tries):
        ty, tx = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        inside = region[ys - y0 + ty, xs - x0 + tx].mean()
        if inside > best_inside:
            best, best_inside = (ty, tx), inside
        if inside == 1.0:
            break
    ty, tx = best
    image, mask = good.copy(), np.zeros(good.shape[:2], np.uint8)
    image[ys - y0 + ty, xs - x0 + tx] = patch[ys, xs]
    mask[ys - y0 + ty, xs - x0 + tx] = 1
    return image, mask


class ArmSampler:
    """defect_batch(rng, n) for one arm: (image, mask) pairs drawn from that arm's source, un-jittered."""

    def __init__(self, arm: str, shots: Pairs, goods: np.ndarray, generated: Pairs | None):
        if arm not in ARMS:
            raise ValueError(f"Unknown arm {arm!r}; use one of {', '.join(ARMS)}.")
        if "generated" in arm and (generated is None or not len(generated)):
            raise ValueError(f"The arm {arm} needs generated pairs.")
        self.arm, self.shots, self.goods, self.generated = arm, shots, goods, generated
        if "copy-paste" in arm:
            self.regions = [object_region(g) for g in goods]
            self.pastable = [i for i in range(len(shots)) if shots.masks[i].any()]

    def _one(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        arm = self.arm
        if "+" in arm:
            arm = arm.split("+")[int(rng.random() < 0.5)]
        if arm == "real":
            i = int(rng.integers(len(self.shots)))
            return self.shots.images[i], self.shots.masks[i]
        if arm == "generated":
            i = int(rng.integers(len(self.generated)))
            return self.generated.images[i], self.generated.masks[i]
        i, j = int(rng.choice(self.pastable)), int(rng.integers(len(self.goods)))
        return paste(self.shots.images[i], self.shots.masks[i], self.goods[j], self.regions[j], rng)

    def defect_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._one(rng) for _ in range(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def good_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.goods[rng.integers(len(self.goods), size=n)]
