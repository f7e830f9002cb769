"""What each arm trains the segmenter on: the shots, copy-paste of the shots, generated pairs, or both.

    python -c "from defect_ds.downstream.arms import ARMS; print(ARMS)"

Every arm's defect samples go through the same flips and small affine jitter, so the arms differ
only in where their defects come from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from defect_ds.data.objects import object_region

ARMS = ("real", "copy-paste", "generated", "real+generated")


@dataclass
class Pairs:
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # uint8 0/1 (N, H, W)
    types: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.images)


def jitter(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, a rotation of up to 10 degrees, a shift of up to 6% and a scale of 0.9-1.1, image and mask alike."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    size = image.shape[0]
    angle, scale = float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1))
    shift = [int(v) for v in rng.integers(-round(0.06 * size), round(0.06 * size) + 1, 2)]
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    msk = torch.from_numpy(np.ascontiguousarray(mask))[None]
    # the border is filled with the image's edge colour, not black, so no false edge appears
    fill = [float(v) for v in np.median(np.concatenate([image[0], image[-1]]), axis=0)]
    img = TF.affine(img, angle=angle, translate=shift, scale=scale, shear=[0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=fill)
    msk = TF.affine(msk, angle=angle, translate=shift, scale=scale, shear=[0.0],
                    interpolation=InterpolationMode.NEAREST, fill=0.0)
    return img.permute(1, 2, 0).numpy(), msk[0].numpy()


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
    """defect_batch(rng, n) for one arm: jittered (image, mask) pairs drawn from that arm's source."""

    def __init__(self, arm: str, shots: Pairs, goods: np.ndarray, generated: Pairs | None):
        self.arm, self.shots, self.goods, self.generated = arm, shots, goods, generated
        if arm == "copy-paste":
            self.regions = [object_region(g) for g in goods]
            self.pastable = [i for i in range(len(shots)) if shots.masks[i].any()]

    def _one(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        arm = self.arm
        if arm == "real+generated":
            arm = "real" if rng.random() < 0.5 else "generated"
        if arm == "real":
            i = int(rng.integers(len(self.shots)))
            return jitter(self.shots.images[i], self.shots.masks[i], rng)
        if arm == "generated":
            i = int(rng.integers(len(self.generated)))
            return jitter(self.generated.images[i], self.generated.masks[i], rng)
        i, j = int(rng.choice(self.pastable)), int(rng.integers(len(self.goods)))
        image, mask = paste(self.shots.images[i], self.shots.masks[i], self.goods[j], self.regions[j], rng)
        return jitter(image, mask, rng)

    def defect_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._one(rng) for _ in range(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def good_batch(self, rng: np.random.Generator, n: int) -> np.ndarray:
        empty = np.zeros(self.goods.shape[1:3], np.uint8)
        return np.stack([jitter(self.goods[int(rng.integers(len(self.goods)))], empty, rng)[0] for _ in range(n)])
