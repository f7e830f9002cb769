"""Image and mask to a square: the one resize and crop that training, latents and evaluation share.

    python -c "import torch; from defect_ds.data.transforms import fit_square; \
print(fit_square(torch.zeros(3, 60, 80, dtype=torch.uint8), None, 32)[0].shape)"

The short side goes to the resolution (the image bilinear with antialiasing, the mask nearest, so
it stays exactly 0/1), then a square is cut: centred, or at a given place for random crops. Latent
shards are encoded from exactly what the loader would feed the VAE (`image_tensors` without flips or
crop offsets), so precomputed latents match the ones the trainer encodes on the fly.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from defect_ds.config import DataConfig
from defect_ds.data.sample import read_sample_bytes


def fit_square(image: torch.Tensor | None, mask: torch.Tensor | None, size: int,
               crop_at: tuple[float, float] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """uint8 (C, H, W) image and/or (1, H, W) mask -> size x size: short side to `size`, then the crop.

    crop_at: (y, x) in [0, 1), where the crop starts within the room the long side leaves; None centres
    it. Image and mask, when both are given, must have the same size and get the same crop."""
    wrapped = ([tv_tensors.Image(image)] if image is not None else []) + (
        [tv_tensors.Mask(mask)] if mask is not None else [])
    if min(wrapped[0].shape[-2:]) != size:
        resized = v2.Resize(size, antialias=True)(*wrapped)  # a Mask is resized nearest: still 0 or 1
        wrapped = list(resized) if len(wrapped) > 1 else [resized]
    height, width = wrapped[0].shape[-2:]
    if crop_at is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(crop_at[0] * (height - size + 1)), int(crop_at[1] * (width - size + 1))
    out = [F.crop(t, top, left, size, size) for t in wrapped]
    fitted_image = out.pop(0) if image is not None else None
    fitted_mask = out.pop(0) if mask is not None else None
    return fitted_image, fitted_mask


def image_tensors(image: Image.Image, mask: np.ndarray, size: int, hflip: bool = False, vflip: bool = False,
                  crop_at: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB image and its bool (H, W) mask -> pixels float32 (3, R, R) in [-1, 1], mask float32 (1, R, R) 0/1."""
    img = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 (3, H, W)
    msk = torch.from_numpy(mask).unsqueeze(0).to(torch.uint8)  # (1, H, W), 0 or 1
    img, msk = fit_square(img, msk, size, crop_at)
    if hflip:
        img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
    if vflip:
        img, msk = F.vertical_flip(img), F.vertical_flip(msk)
    pixels = F.to_dtype(img, torch.float32, scale=True).as_subclass(torch.Tensor) * 2.0 - 1.0
    return pixels, msk.as_subclass(torch.Tensor).float()


def transform_image_sample(raw: dict, cfg: DataConfig, hflip: bool, vflip: bool,
                           crop_at: tuple[float, float] | None) -> dict[str, Any]:
    """Decode, resize the short side to the resolution, crop (centre or at `crop_at`), flip; image and
    mask together. The image ends in [-1, 1]; the mask is resized nearest and is exactly 0 or 1."""
    image, mask, caption, record = read_sample_bytes(raw, cfg.max_image_pixels)
    pixels, mask_t = image_tensors(image, mask, cfg.resolution_px, hflip, vflip, crop_at)
    return {"pixel_values": pixels, "mask": mask_t, "caption": caption,
            "defect_type": str(record.get("defect_type", "?"))}
