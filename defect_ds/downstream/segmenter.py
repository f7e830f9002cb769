"""The inspector: a small discriminative U-Net (DRAEM's segmentation net, narrower) trained from scratch,
or, for image-level labels, its encoder with a pooled head (`DefectClassifier`).

    python -c "import torch; from defect_ds.downstream.segmenter import SegmentationUNet as S; print(S()(torch.zeros(1, 3, 64, 64)).shape)"
    python -c "import torch; from defect_ds.downstream.segmenter import DefectClassifier as C; print(C(8)(torch.zeros(2, 3, 64, 64)).shape)"

Every arm trains the same net for the same steps from the same initial weights per seed; only the
defect samples it sees differ. Half of every batch is good images with empty masks, as the
published evaluations mix them. What keeps a seed from collapsing (docs/downstream.md, The segmenter):
GroupNorm instead of BatchNorm (no statistics of a 16-image batch that differ between training and
test), a linear warm-up, gradient clipping and AdamW. Augmentation runs on the whole batch at once as
one affine resampling (flips, rotation, shift, scale), not per sample in Python.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

GROUPS = 4  # GroupNorm groups: every level's width (a multiple of 4) divides into them


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(GROUPS, c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(GROUPS, c_out), nn.ReLU(inplace=True))


def _encoder(width: int) -> nn.ModuleList:
    """Four levels of two convolutions, `width` channels doubling per level."""
    if width < GROUPS or width % GROUPS:
        raise ValueError(f"Segmenter width {width} must be a positive multiple of {GROUPS}.")
    w = [width, 2 * width, 4 * width, 8 * width]
    return nn.ModuleList([_block(3, w[0]), _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])])


def _encode(down: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Each level's features, the first at full size, each next one at half the size of the last."""
    levels = []
    for i, block in enumerate(down):
        x = block(x if i == 0 else F.max_pool2d(x, 2))
        levels.append(x)
    return levels


class SegmentationUNet(nn.Module):
    """Image (N, 3, H, W) in [-1, 1] -> defect logits (N, 1, H, W); H and W divisible by 8."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.down = _encoder(width)
        w = [width, 2 * width, 4 * width, 8 * width]
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(3)])
        self.merge = nn.ModuleList([_block(2 * w[i], w[i]) for i in range(3)])
        self.head = nn.Conv2d(w[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = _encode(self.down, x)
        x = skips.pop()
        for i in reversed(range(3)):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


class DefectClassifier(nn.Module):
    """Image (N, 3, H, W) in [-1, 1] -> defect logit (N, 1): the segmenter's encoder, then the mean and the
    max of its deepest features (a defect may be a thin crack in one corner) into one linear unit."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.down = _encoder(width)
        self.head = nn.Linear(2 * 8 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _encode(self.down, x)[-1]
        return self.head(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))


NETS = {"segment": SegmentationUNet, "classify": DefectClassifier}


def classification_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE of the image logit (N, 1) against "the (jittered) mask has a defect pixel" (masks (N, 1, H, W))."""
    return F.binary_cross_entropy_with_logits(logits[:, 0], masks.flatten(1).amax(dim=1))


LOSSES = ("bce-dice-image", "bce-dice", "focal")
# each image's own Dice: on the validation draw it lifted every arm's scratches and narrowed the seeds' spread
# (benchmarks/results/segmenter-2026-12-03-image-dice-val-amx.md, docs/downstream.md)
DEFAULT_LOSS = "bce-dice-image"


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, kind: str = DEFAULT_LOSS) -> torch.Tensor:
    """BCE plus soft Dice on the defect class, or focal loss (torchvision's, DRAEM's choice).

    "bce-dice" takes one Dice over the whole batch, so a thin scratch's few pixels weigh little beside a
    large spot's; "bce-dice-image" takes the mean of each defect image's own Dice, so every defect weighs
    the same whatever its area (good images, with empty masks, count through the BCE only)."""
    if kind not in LOSSES:
        raise ValueError(f"Unknown segmentation loss {kind!r}; use one of {', '.join(LOSSES)}.")
    if kind == "focal":
        return sigmoid_focal_loss(logits, masks, alpha=0.25, gamma=2.0, reduction="mean") * 10
    probs = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    if kind == "bce-dice":
        return bce + 1 - (2 * (probs * masks).sum() + 1) / (probs.sum() + masks.sum() + 1)
    area = masks.flatten(1).sum(dim=1)
    has_defect = area > 0
    if not has_defect.any():
        return bce
    overlap = (probs * masks).flatten(1).sum(dim=1)[has_defect]
    dice = 1 - (2 * overlap + 1) / (probs.flatten(1).sum(dim=1)[has_defect] + area[has_defect] + 1)
    return bce + dice.mean()


def jitter_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: flips, a rotation of up to 10 degrees, a shift of up to 6% and a scale of 0.9-1.1, image
    and mask alike, as one affine resampling of the batch. images float (N, 3, H, W), masks float (N, 1, H, W)
    0/1; the border repeats the image's edge (no false edge) and the mask stays exactly 0/1 (nearest)."""
    n = len(images)
    flip = torch.from_numpy(np.where(rng.random((n, 2)) < 0.5, -1.0, 1.0)).float()
    angle = torch.from_numpy(np.deg2rad(rng.uniform(-10, 10, n))).float()
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float()
    shift = torch.from_numpy(rng.uniform(-0.12, 0.12, (n, 2))).float()  # 6% of the side, in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip[:, 0], -sin * flip[:, 1], shift[:, 0]], 1),
                         torch.stack([sin * flip[:, 0], cos * flip[:, 1], shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images, masks


# RGB -> YIQ: luma and two chroma axes; a rotation of the chroma plane turns the hue, a scale of it the saturation
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_jitter_batch(images: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Per sample: brightness shifted by up to `strength` (images in [-1, 1]), contrast about the image's mean
    and saturation scaled by 1 +- strength, hue turned by up to strength * 90 degrees; one 3x3 colour matrix
    per image, applied to the whole batch at once. Masks are untouched: a defect keeps its pixels, not its
    colour, so the segmenter cannot rely on one shade (generated and real defects differ most in it)."""
    n = len(images)
    brightness = torch.from_numpy(rng.uniform(-strength, strength, n)).float()
    contrast = torch.from_numpy(rng.uniform(1 - strength, 1 + strength, n)).float()
    saturation = torch.from_numpy(rng.uniform(1 - strength, 1 + strength, n)).float()
    hue = torch.from_numpy(rng.uniform(-strength, strength, n) * math.pi / 2).float()
    chroma = torch.zeros(n, 3, 3)
    chroma[:, 0, 0] = 1.0
    chroma[:, 1, 1], chroma[:, 1, 2] = saturation * torch.cos(hue), -saturation * torch.sin(hue)
    chroma[:, 2, 1], chroma[:, 2, 2] = saturation * torch.sin(hue), saturation * torch.cos(hue)
    matrix = torch.linalg.inv(_YIQ) @ chroma @ _YIQ  # (N, 3, 3), RGB -> RGB
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = torch.einsum("nij,njhw->nihw", matrix, images - mean) * contrast.view(n, 1, 1, 1)
    return (out + mean + brightness.view(n, 1, 1, 1)).clamp(-1.0, 1.0)


def learning_rate_at(step: int, steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_segmenter(defect_batch: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
                    good_batch: Callable[[np.random.Generator, int], np.ndarray], *, steps: int, batch_size: int,
                    seed: int, width: int = 16, loss: str = DEFAULT_LOSS, learning_rate: float = 2e-3,
                    warmup_steps: int = 30, clip_norm: float = 1.0, ema_decay: float = 0.0, colour: float = 0.0,
                    on_step: Callable[[int], None] | None = None, task: str = "segment") -> nn.Module:
    """defect_batch(rng, n) -> (uint8 images n,H,W,3, 0/1 masks n,H,W); good_batch(rng, n) -> images.
    The initial weights and the augmentation are functions of `seed` alone, so arms share them.
    task "classify" trains a `DefectClassifier` on whether each sample has a defect pixel (`loss` unused).
    ema_decay > 0 returns the exponential moving average of the weights (torch's AveragedModel) instead
    of the last step's: one late batch moves the average less than it moves the last weights.
    colour > 0 adds `colour_jitter_batch` of that strength, from its own stream (the affine jitter is unchanged)."""
    if steps < 1 or batch_size < 2:
        raise ValueError(f"The segmenter needs steps >= 1 and batch_size >= 2 (got {steps} and {batch_size}).")
    if task not in NETS:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(NETS)}.")
    torch.manual_seed(seed)
    net = NETS[task](width).to(memory_format=torch.channels_last)  # faster convolutions on the CPU
    average = (torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        ema_decay), use_buffers=True) if ema_decay > 0 else None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    augment_rng = np.random.default_rng([seed, 1])  # the same jitter stream for every arm
    colour_rng = np.random.default_rng([seed, 2])
    n_defect = batch_size // 2
    net.train()
    for step in range(steps):
        images, masks = defect_batch(rng, n_defect)
        goods = good_batch(rng, batch_size - n_defect)
        x = to_tensor(np.concatenate([images, goods]))
        y = torch.from_numpy(np.concatenate([masks, np.zeros((len(goods), *masks.shape[1:]), masks.dtype)]))
        x, y = jitter_batch(x, y.float().unsqueeze(1), augment_rng)
        if colour > 0:
            x = colour_jitter_batch(x, colour_rng, colour)
        x = x.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, learning_rate, min(warmup_steps, steps))
        value = segmentation_loss(net(x), y, loss) if task == "segment" else classification_loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
        optimizer.step()
        if average is not None:
            average.update_parameters(net)
        if on_step is not None:
            on_step(step + 1)
    return (net if average is None else average.module).eval()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


FLIPS = ((), (3,), (2,), (2, 3))  # none, left-right, up-down, both: the flips the training jitter draws


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray, batch_size: int = 64, flips: bool = False) -> np.ndarray:
    """Defect probability per pixel, float32 (N, H, W), or per image (N,) from a `DefectClassifier`.
    flips: the mean probability over the image and its three flips (test-time augmentation), each pixel's
    map flipped back to the image's own orientation."""
    def probability(x: torch.Tensor) -> torch.Tensor:
        if not flips:
            return torch.sigmoid(net(x))[:, 0]
        maps = []
        for dims in FLIPS:
            p = torch.sigmoid(net(torch.flip(x, dims) if dims else x))
            maps.append(torch.flip(p, dims) if dims and p.ndim == 4 else p)
        return torch.stack(maps).mean(dim=0)[:, 0]

    out = [probability(to_tensor(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()
