"""One WebDataset sample: a key plus `image.png`, `mask.png`, `caption.txt` and a `json` record.

Reading source files (prepare time) and sample bytes (load time) both go through the checks here, so
a bad input fails the same way everywhere: a `BadSampleError` that names the file or sample key.

    python -c "from defect_ds.data.sample import SAMPLE_FILES; print(SAMPLE_FILES)"
"""
from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# The files of one sample inside a shard, after its key: `<key>.image.png` and so on.
SAMPLE_FILES = ("image.png", "mask.png", "caption.txt", "json")
GOOD = "good"  # the defect type of a defect-free image; its mask is empty and it has no token
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (8192 x 8192); more is treated as a decompression bomb
MASK_THRESHOLD = 128  # a mask pixel is defect where its brightness (0..255) is at least this


class BadSampleError(ValueError):
    """A source file or shard sample that cannot be used; the message names it."""


@dataclass
class Sample:
    """A decoded sample, ready to encode into a shard."""

    key: str  # unique within the data set; letters, digits, `_` and `-` only (no dots: WebDataset splits on them)
    image: Image.Image  # RGB
    mask: Image.Image  # mode L, values 0 or 255, same size as the image
    caption: str
    record: dict[str, Any] = field(default_factory=dict)  # category, defect_type, source, split, size, ...

    def resized(self, side_px: int) -> Sample:
        """The sample at side_px x side_px (for square sources: no crop, no padding); the mask stays binary."""
        if self.image.size == (side_px, side_px):
            return self
        size = (side_px, side_px)
        return Sample(self.key, self.image.resize(size, Image.Resampling.LANCZOS),
                      self.mask.resize(size, Image.Resampling.NEAREST), self.caption, dict(self.record))

    def encode(self) -> dict[str, Any]:
        """The dict `webdataset.TarWriter.write` takes: bytes per file name."""
        check_sample(self)
        record = dict(self.record, size=list(self.image.size))
        return {"__key__": self.key, "image.png": png_bytes(self.image), "mask.png": png_bytes(self.mask),
                "caption.txt": self.caption.encode("utf-8"),
                "json": json.dumps(record, sort_keys=True).encode("utf-8")}


def check_sample(sample: Sample) -> None:
    where = sample.record.get("source") or sample.key
    if not sample.key or any(c in sample.key for c in "./\\ "):
        raise BadSampleError(f"Sample key {sample.key!r} ({where}) is invalid; use letters, digits, _ and - only.")
    if sample.image.mode != "RGB" or sample.mask.mode != "L":
        raise BadSampleError(f"{where}: image must be RGB and mask L, got {sample.image.mode} and "
                             f"{sample.mask.mode}; convert them before writing.")
    if sample.image.size != sample.mask.size:
        raise BadSampleError(f"{where}: the mask is {sample.mask.size[0]}x{sample.mask.size[1]} but the image "
                             f"is {sample.image.size[0]}x{sample.image.size[1]}; give a mask of the image's size.")
    if not sample.caption.strip():
        raise BadSampleError(f"{where}: the caption is empty; give every image a caption or a caption template.")


def sanitise_key(text: str) -> str:
    """A sample key from any text: WebDataset keys may not hold dots, slashes or spaces."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast to write; shards are read far more than written
    return buf.getvalue()


def open_image(data: bytes | str | Path, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Opens and fully decodes an image, refusing non-images, truncated files and decompression bombs."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        image = _open_header(source)
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > max_pixels:
            image.close()
            raise BadSampleError(f"{name} is {width}x{height} pixels, more than the limit of {max_pixels} "
                                 f"(a decompression bomb?); shrink it or raise the limit.")
        image.load()
    except BadSampleError:
        raise
    except FileNotFoundError:
        raise BadSampleError(f"{name} does not exist; fix the path or remove the entry.") from None
    except UnidentifiedImageError:
        raise BadSampleError(f"{name} is not an image file; remove it or replace it with a PNG or JPEG.") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these on truncated or corrupt data
        raise BadSampleError(f"{name} is truncated or corrupt ({e}); re-export or remove it.") from None
    return image


_PIL_LIMIT_LOCK = threading.Lock()


def _open_header(source: io.BytesIO | str | Path) -> Image.Image:
    """`Image.open` (header only) with PIL's own pixel limit lifted, so `max_pixels` alone decides.

    PIL checks its process-wide `Image.MAX_IMAGE_PIXELS` (about 89 M pixels) inside `Image.open`, which
    would refuse images a raised `max_pixels` admits. Parsing a header allocates no pixels and the caller
    checks the size before `load()`, so the limit is lifted only around this call and restored at once;
    the lock keeps two threads of ours from restoring each other's value.
    """
    with _PIL_LIMIT_LOCK:
        pil_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit and RGBA inputs become RGB; transparency is composited on black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = max(array.max(), 1.0)
        return Image.fromarray((array * (255.0 / top)).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_binary_mask(image: Image.Image) -> Image.Image:
    """Any mask image becomes mode L with 0 or 255 (see `mask_array`)."""
    return Image.fromarray(np.where(mask_array(image), 255, 0).astype(np.uint8))


def mask_array(image: Image.Image) -> np.ndarray:
    """A bool (H, W) mask of any mask image: defect where the brightness is >= MASK_THRESHOLD."""
    return np.asarray(image.convert("L")) >= MASK_THRESHOLD


def empty_mask(size: tuple[int, int]) -> Image.Image:
    return Image.new("L", size, 0)


def full_mask(size: tuple[int, int]) -> Image.Image:
    return Image.new("L", size, 255)


def read_sample_bytes(raw: dict[str, Any], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                      ) -> tuple[Image.Image, np.ndarray, str, dict[str, Any]]:
    """Decodes one shard sample (file name -> bytes) into RGB image, bool mask (H, W), caption, record."""
    key = f"sample {raw.get('__key__')!r} of {raw.get('__url__', '?')}"
    missing = [name for name in SAMPLE_FILES if name not in raw]
    if missing:
        raise BadSampleError(f"{key} lacks {', '.join(missing)}; re-run `defect-ds prepare` for that shard.")
    image = to_rgb(open_image(raw["image.png"], f"{key} image.png", max_pixels))
    mask_image = open_image(raw["mask.png"], f"{key} mask.png", max_pixels)
    if mask_image.size != image.size:
        raise BadSampleError(f"{key}: mask.png is {mask_image.size} but image.png is {image.size}; "
                             "re-run `defect-ds prepare` for that shard.")
    mask = mask_array(mask_image)
    caption = raw["caption.txt"].decode("utf-8", errors="replace").strip()
    if not caption:
        raise BadSampleError(f"{key} has an empty caption.txt; re-run `defect-ds prepare` for that shard.")
    try:
        record = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSampleError(f"{key} has an unreadable json record ({e}).") from None
    return image, mask, caption, record
