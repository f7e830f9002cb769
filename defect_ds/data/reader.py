"""Reading images, masks and data sets for `defect-ds generate` and `defect-ds evaluate`.

A data set here is any of: training shards (`defect-ds prepare`), a `defect-ds generate` output
folder (its samples/), or a folder of images (one subfolder per defect type). Masks for generation
come from a folder of PNGs or from a data set's defect masks; good images to inpaint into come from a
folder of images or a data set's `good` samples.

    python -c "from defect_ds.data.reader import iter_dataset; print(sum(1 for _ in iter_dataset('work/data')))"
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

log = logging.getLogger("defect_ds.generate.pipeline")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
MaskPool = dict[str, list[tuple[np.ndarray, str, str]]]  # defect type or "*" -> [(mask, origin, category)]


def fit_square(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize the short side to `size`, then centre-crop to size x size."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _open(data: bytes | str | Path) -> Image.Image:
    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def load_rgb(data: bytes | str | Path, size: int | None = None) -> np.ndarray:
    image = _open(data).convert("RGB")
    if size is not None and image.size != (size, size):
        image = fit_square(image, size)
    return np.asarray(image, dtype=np.uint8).copy()


def load_mask(data: bytes | str | Path, size: int | None = None) -> np.ndarray:
    """A uint8 0/1 (H, W) mask from a PNG (values above 127 are defect), centre-cropped like its image."""
    image = _open(data).convert("L")
    if size is not None and image.size != (size, size):
        image = fit_square(image, size, Image.NEAREST)
    return (np.asarray(image) > 127).astype(np.uint8)


def fit_defect_mask(data: bytes | str | Path, size: int) -> tuple[np.ndarray, bool]:
    """A mask without its image, made size x size so that the defect survives: (uint8 0/1 mask, had defect).

    The short side is scaled to `size` and the square window slides along the long side to the
    defect's centre (a centre crop would cut off a defect near the edge of a wide mask). Nearest
    resizing can drop a defect thinner than the scale step; such a mask is resized by max instead
    (a pixel is defect when any source pixel under it is), so a defect never vanishes.
    """
    binary = (np.asarray(_open(data).convert("L")) > 127)
    if not binary.any():
        return np.zeros((size, size), np.uint8), False
    h, w = binary.shape
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    ys, xs = np.nonzero(binary)
    # the window's top-left in the resized mask, centred on the defect's bounding box, kept inside
    cy, cx = (ys.min() + ys.max() + 1) / 2 * scale, (xs.min() + xs.max() + 1) / 2 * scale
    top = int(np.clip(round(cy - size / 2), 0, new_h - size))
    left = int(np.clip(round(cx - size / 2), 0, new_w - size))
    image = Image.fromarray(binary.astype(np.uint8) * 255)
    for resample in (Image.NEAREST, Image.BOX):  # BOX then > 0 is a max resize
        resized = np.asarray(image.resize((new_w, new_h), resample))[top:top + size, left:left + size]
        mask = (resized > (127 if resample == Image.NEAREST else 0)).astype(np.uint8)
        if mask.any():
            break
    return mask, True


def shard_files(folder: Path, splits: tuple[str, ...] | None = None) -> list[Path]:
    files = sorted(folder.glob("*.tar"))
    if splits is not None:
        files = [f for f in files if f.name.split("-")[0] in splits]
    return files


def iter_dataset(path: str | Path, splits: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Samples of a data set: WebDataset shards, a generated samples/ folder, or a folder of images.

    Yields {"key", "image" (bytes), "mask" (bytes or None), "meta" (dict), "source" (bytes or None),
    "kind" ("shards", "folder" or "images")}.
    Plain image folders: the defect type is the image's parent folder name ("all" at the top).
    """
    import webdataset as wds

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a shards folder, a generated folder or "
                                "a folder of images.")
    if (path / "samples").is_dir():
        path = path / "samples"
    shards = shard_files(path, splits) if path.is_dir() else [path]
    if shards and shards[0].suffix == ".tar":
        for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"]) if "json" in sample else {}
            yield {"key": sample["__key__"], "image": sample["image.png"], "mask": sample.get("mask.png"),
                   "meta": meta, "source": sample.get("source.png"), "kind": "shards"}
        return
    for folder in sorted(p.parent for p in path.glob("*/json")):
        meta = json.loads((folder / "json").read_text())
        if splits is not None and meta.get("split", "train") not in splits:
            continue
        yield {"key": folder.name, "image": (folder / "image.png").read_bytes(),
               "mask": (folder / "mask.png").read_bytes() if (folder / "mask.png").is_file() else None,
               "meta": meta,
               "source": (folder / "source.png").read_bytes() if (folder / "source.png").is_file() else None,
               "kind": "folder"}
    if any(path.glob("*/json")):
        return
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        defect_type = file.parent.name if file.parent != path else "all"
        yield {"key": f"{defect_type}/{file.stem}", "image": file.read_bytes(), "mask": None,
               "meta": {"defect_type": defect_type}, "source": None, "kind": "images"}


def load_mask_pool(kind: str, path: str | None, size: int) -> MaskPool:
    """Masks by defect type from a folder of PNGs (subfolders name types) or a data set's masks.

    A mask with no defect pixel would label a generated defect with nothing: such files are skipped
    with one warning that counts them (a data set's good samples, empty by design, are skipped silently).
    """
    if kind == "procedural":
        return {}
    if not path:
        flag = "--mask-dir" if kind == "files" else "--data"
        raise ValueError(f"--masks {kind} needs {flag} DIR.")
    pool: MaskPool = {}
    empty: list[str] = []
    if kind == "files":
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"--mask-dir {folder} is not a folder; pass a folder of mask PNGs.")
        for f in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            mask, _ = fit_defect_mask(f, size)
            if not mask.any():
                empty.append(str(f))
                continue
            defect_type = f.parent.name if f.parent != folder else "*"
            pool.setdefault(defect_type, []).append((mask, str(f), ""))
    else:
        for sample in iter_dataset(path):
            if sample["mask"] is None:
                continue
            mask, had_defect = fit_defect_mask(sample["mask"], size)
            if not mask.any():
                if had_defect:
                    empty.append(f"{path}:{sample['key']}")
                continue
            meta = sample["meta"]
            pool.setdefault(meta.get("defect_type", "*"), []).append(
                (mask, f"{path}:{sample['key']}", meta.get("category", "")))
    if not pool:
        first = f" (e.g. {empty[0]})" if empty else ""
        raise ValueError(f"{path} holds no mask with defect pixels{first}; masks are white (> 127) where the "
                         "defect is, so pass mask PNGs or a data set with non-empty defect masks.")
    if empty:
        log.warning("skipped %d mask(s) of %s with no defect pixels (first: %s)", len(empty), path, empty[0])
    return pool


def load_sources(path: str | None, size: int) -> list[tuple[np.ndarray, str, str]]:
    """Good images for inpainting: a folder of images, or the defect-free samples of a data set."""
    if not path:
        raise ValueError("--mode inpaint needs --sources DIR (good images, or a data set's good samples).")
    out = []
    for sample in iter_dataset(path):
        meta = sample["meta"]
        is_good = sample["kind"] == "images" or meta.get("defect_type") == "good" or (
            sample["mask"] is not None and not load_mask(sample["mask"]).any())
        if is_good:
            out.append((load_rgb(sample["image"], size), f"{path}:{sample['key']}", meta.get("category", "")))
    if not out:
        raise ValueError(f"{path} holds no good (defect-free) images to inpaint into; pass a folder of "
                         "images or a data set with defect_type 'good' samples.")
    return out
