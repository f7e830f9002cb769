"""What each arm trains the inspector on: the shots, copy-paste or CutMix of the shots, generated pairs,
both, or every training-side defect image (`all-real`, the ceiling).

    python -c "from defect_ds.downstream.arms import TASK_ARMS; print(TASK_ARMS)"

Every arm's samples go through the same flips and small affine jitter (the segmenter applies it to the
whole batch, `segmenter.jitter_batch`), so the arms differ only in where their defects come from. The
mixed arms (`real+generated`, `copy-paste+generated`, `cutmix+generated`) draw each defect sample from
either source with probability one half. Copy-paste needs masks that outline the defect, so it is a
segmentation arm; CutMix needs none, so it is the classification task's mask-free baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defect_ds.data.objects import object_region

TASK_ARMS = {"segment": ("real", "copy-paste", "generated", "real+generated", "copy-paste+generated", "all-real"),
             "classify": ("real", "cutmix", "generated", "real+generated", "cutmix+generated", "all-real")}
BASELINES = {"segment": ("real", "copy-paste"), "classify": ("real", "cutmix")}  # what every arm is compared with
ARMS = tuple(dict.fromkeys(TASK_ARMS["segment"] + TASK_ARMS["classify"]))


@dataclass
class Pairs:
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # uint8 0/1 (N, H, W)
    types: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def __add__(self, other: Pairs) -> Pairs:
        return Pairs(np.concatenate([self.images, other.images]), np.concatenate([self.masks, other.masks]),
                     self.types + other.types, self.keys + other.keys)


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


def cutmix(shot: np.ndarray, shot_mask: np.ndarray, good: np.ndarray, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """CutMix (Yun et al. 2019) as a defect sample: a random box of the shot pasted at the same place into
    `good`, labelled by the shot's mask inside the box (with an image-level label's full mask: the box).
    The box covers a quarter to three quarters of the image, aspect 1:2 to 2:1; CutMix draws any area, but
    a small box of a cell with one crack would mostly carry no defect and still be labelled defective."""
    height, width = good.shape[:2]
    area, aspect = rng.uniform(0.25, 0.75), np.exp(rng.uniform(-np.log(2), np.log(2)))
    h = min(height, max(1, round(height * np.sqrt(area * aspect))))
    w = min(width, max(1, round(width * np.sqrt(area / aspect))))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    image, mask = good.copy(), np.zeros(good.shape[:2], np.uint8)
    image[y:y + h, x:x + w] = shot[y:y + h, x:x + w]
    mask[y:y + h, x:x + w] = shot_mask[y:y + h, x:x + w]
    return image, mask


class ArmSampler:
    """defect_batch(rng, n) for one arm: (image, mask) pairs drawn from that arm's source, un-jittered.
    `pool` (the split's training-side defect images that are not shots) is drawn by `all-real` alone."""

    def __init__(self, arm: str, shots: Pairs, goods: np.ndarray, generated: Pairs | None, pool: Pairs | None = None):
        if arm not in ARMS:
            raise ValueError(f"Unknown arm {arm!r}; use one of {', '.join(ARMS)}.")
        if "generated" in arm and (generated is None or not len(generated)):
            raise ValueError(f"The arm {arm} needs generated pairs.")
        if arm == "all-real" and (pool is None or not len(pool)):
            raise ValueError("The arm all-real needs the split's pool of training-side defect images.")
        self.arm, self.shots, self.goods, self.generated = arm, shots, goods, generated
        if arm == "all-real":
            self.shots = shots + pool
        if "copy-paste" in arm:
            self.regions = [object_region(g) for g in goods]
            self.pastable = [i for i in range(len(shots)) if shots.masks[i].any()]

    def _one(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        arm = self.arm
        if "+" in arm:
            arm = arm.split("+")[int(rng.random() < 0.5)]
        if arm in ("real", "all-real"):
            i = int(rng.integers(len(self.shots)))
            return self.shots.images[i], self.shots.masks[i]
        if arm == "generated":
            i = int(rng.integers(len(self.generated)))
            return self.generated.images[i], self.generated.masks[i]
        if arm == "cutmix":
            i, j = int(rng.integers(len(self.shots))), int(rng.integers(len(self.goods)))
            return cutmix(self.shots.images[i], self.shots.masks[i], self.goods[j], rng)
        i, j = int(rng.choice(self.pastable)), int(rng.integers(len(self.goods)))
        return paste(self.shots.images[i], self.shots.masks[i], self.goods[j], self.regions[j], rng)

    def defect_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._one(rng) for _ in range(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def good_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.goods[rng.integers(len(self.goods), size=n)]
