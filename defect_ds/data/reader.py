"""The one reader of shards and sample folders, and of images and masks for generate and evaluate.

A data set here is any of: training shards (`defect-ds prepare`), a `defect-ds generate` output
folder (its samples/), or a folder of images (one subfolder per defect type). Masks for generation
come from a folder of PNGs or from a data set's defect masks; good images to inpaint into come from a
folder of images or a data set's `good` samples.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from webdataset.tariterators import group_by_keys
from PIL import Image

from defect_ds.data.sample import MASK_THRESHOLD, BadSampleError, mask_array, open_image
from defect_ds.data.shards import MANIFEST, read_manifest
from defect_ds.data.transforms import fit_square

log = logging.getLogger("defect_ds.data")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
MaskPool = dict[str, list[tuple[np.ndarray, str, str]]]  # defect type or "*" -> [(mask, origin, category)]


def _open(data: bytes | str | Path | Image.Image) -> Image.Image:
    if isinstance(data, Image.Image):  # decoded and checked already (see `checked_image`)
        return data
    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


class UnreadableInputError(BadSampleError):
    """A truncated or corrupt input file: a caller that passes a `skipped` list is given None instead."""


def checked_image(data: bytes | str | Path, name: str, skipped: list[str] | None) -> Image.Image | None:
    """The fully decoded image, or, for a truncated or corrupt one, an UnreadableInputError naming `name`
    (skipped is None) or None with the file and reason appended to `skipped`."""
    try:
        return open_image(data, name)
    except BadSampleError as e:
        if skipped is None:
            raise UnreadableInputError(str(e)) from None
        skipped.append(str(e))
        return None


def load_rgb(data: bytes | str | Path | Image.Image, size: int | None = None) -> np.ndarray:
    """A uint8 (H, W, 3) image, made size x size as the training loader does (see `data/transforms.py`)."""
    image = np.asarray(_open(data).convert("RGB"), dtype=np.uint8)
    if size is not None and image.shape[:2] != (size, size):
        fitted, _ = fit_square(torch.from_numpy(image.copy()).permute(2, 0, 1), None, size)
        image = fitted.permute(1, 2, 0).numpy()
    return image.copy()


def load_mask(data: bytes | str | Path | Image.Image, size: int | None = None) -> np.ndarray:
    """A uint8 0/1 (H, W) mask from a PNG, resized and cropped as its image is."""
    mask = mask_array(_open(data)).astype(np.uint8)
    if size is not None and mask.shape != (size, size):
        _, fitted = fit_square(None, torch.from_numpy(mask)[None], size)
        mask = fitted[0].numpy()
    return np.ascontiguousarray(mask)


def fit_defect_mask(data: bytes | str | Path | Image.Image, size: int) -> tuple[np.ndarray, bool]:
    """A mask without its image, made size x size so that the defect survives: (uint8 0/1 mask, had defect).

    The short side is scaled to `size` and the square window slides along the long side to the
    defect's centre (a centre crop would cut off a defect near the edge of a wide mask). Nearest
    resizing can drop a defect thinner than the scale step; such a mask is resized by max instead
    (a pixel is defect when any source pixel under it is), so a defect never vanishes.
    """
    binary = mask_array(_open(data))
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
        mask = (resized >= (MASK_THRESHOLD if resample == Image.NEAREST else 1)).astype(np.uint8)
        if mask.any():
            break
    return mask, True


def shard_paths(folder: Path, manifest: dict, splits: tuple[str, ...] | None = None) -> list[tuple[str, Path]]:
    """(split, path) of every shard the manifest lists ({split: [{"name": ...} or name]} or [name]), in its
    order; a listed shard that is missing is an error naming it."""
    listed = manifest["shards"]
    if isinstance(listed, dict):
        items = [(split, info["name"] if isinstance(info, dict) else info)
                 for split, infos in listed.items() for info in infos]
    else:
        items = [(str(name).split("-")[0], name) for name in listed]
    for _, name in items:
        if not isinstance(name, str) or PurePosixPath(name).name != name or name in (".", "..") or "\\" in name:
            raise ValueError(f"{Path(folder) / MANIFEST} lists the shard {name!r}, which is not a file of that "
                             "folder; a manifest names its shards by file name only, so re-run `defect-ds "
                             "prepare` for that folder.")
    out = [(split, Path(folder) / name) for split, name in items if splits is None or split in splits]
    missing = [str(path) for _, path in out if not path.is_file()]
    if missing:  # the loader checks this on every rank before any rank starts, so all of them stop together
        raise FileNotFoundError(f"Shard {missing[0]} is listed in the manifest but missing; re-run "
                                "`defect-ds prepare` for that folder.")
    return out


def read_shards(paths: list[Path]) -> Iterator[dict]:
    """The raw samples (file name -> bytes, plus __key__ and __url__) of the shards, in order, grouped by
    key as webdataset groups them. A member that is a link, or whose name is absolute or climbs out
    with `..`, is refused in one sentence naming shard and member (webdataset would silently drop
    the one and mis-key the other), as is a shard cut short inside a member."""
    return group_by_keys(_shard_members(paths))


def _shard_members(paths: list[Path]) -> Iterator[dict]:
    for path in paths:
        try:
            with tarfile.open(path, "r|*") as tar:  # streamed: each member is read once, in order
                for info in tar:
                    if info.isdir():
                        continue
                    problem = ("a link" if info.issym() or info.islnk() else
                               "not a plain file" if not info.isreg() else
                               "an absolute path" if info.name.startswith("/") else
                               "a path out of the shard" if ".." in PurePosixPath(info.name).parts else "")
                    if problem:
                        raise BadSampleError(f"Shard {path} holds the member {info.name!r}, which is {problem}; "
                                             "shards hold plain files named KEY.EXT, so re-run `defect-ds "
                                             "prepare` for that folder.")
                    data = tar.extractfile(info).read()
                    tar.members = []  # a streamed archive need not remember what was read
                    yield {"fname": info.name, "data": data, "__url__": str(path)}
        except (tarfile.TarError, EOFError) as e:
            raise BadSampleError(f"Shard {path} is truncated or not a tar file ({e}); re-run `defect-ds prepare` "
                                 "for that folder.") from None


def _folder_shards(folder: Path, splits: tuple[str, ...] | None) -> list[Path]:
    """A folder's shards: those its manifest lists, else every .tar in it."""
    if (folder / MANIFEST).is_file():
        return [path for _, path in shard_paths(folder, read_manifest(folder), splits)]
    return [f for f in sorted(folder.glob("*.tar")) if splits is None or f.name.split("-")[0] in splits]


def iter_dataset(path: str | Path, splits: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Samples of a data set: WebDataset shards, a generated samples/ folder, or a folder of images.

    Yields {"key", "image" (bytes), "mask" (bytes or None), "meta" (dict), "source" (bytes or None),
    "caption" (str or None), "kind" ("shards", "folder" or "images"), "where" (the image's file, or shard
    and key, for messages), "mask_where"}.
    Plain image folders: the defect type is the image's parent folder name ("all" at the top).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a shards folder, a generated folder or "
                                "a folder of images.")
    if (path / "samples").is_dir():
        path = path / "samples"
    shards = _folder_shards(path, splits) if path.is_dir() else [path]
    if shards and shards[0].suffix == ".tar":
        for sample in read_shards(shards):
            if "image.png" not in sample:
                raise BadSampleError(f"Sample {sample['__key__']!r} of shard {sample['__url__']} has no image.png "
                                     f"(only {', '.join(k for k in sample if not k.startswith('__')) or 'nothing'});"
                                     " re-run `defect-ds prepare` for that folder.")
            meta = json.loads(sample["json"]) if "json" in sample else {}
            yield {"key": sample["__key__"], "image": sample["image.png"], "mask": sample.get("mask.png"),
                   "meta": meta, "source": sample.get("source.png"),
                   "caption": sample["caption.txt"].decode("utf-8") if "caption.txt" in sample else None,
                   "kind": "shards", "where": f"{sample.get('__url__')}:{sample['__key__']}.image.png",
                   "mask_where": f"{sample.get('__url__')}:{sample['__key__']}.mask.png"}
        return
    for folder in sorted(p.parent for p in path.glob("*/json")):
        meta = json.loads((folder / "json").read_text())
        if splits is not None and meta.get("split", "train") not in splits:
            continue
        yield {"key": folder.name, "image": (folder / "image.png").read_bytes(),
               "mask": (folder / "mask.png").read_bytes() if (folder / "mask.png").is_file() else None,
               "meta": meta,
               "source": (folder / "source.png").read_bytes() if (folder / "source.png").is_file() else None,
               "caption": (folder / "caption.txt").read_text() if (folder / "caption.txt").is_file() else None,
               "kind": "folder", "where": str(folder / "image.png"), "mask_where": str(folder / "mask.png")}
    if any(path.glob("*/json")):
        return
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        defect_type = file.parent.name if file.parent != path else "all"
        yield {"key": f"{defect_type}/{file.stem}", "image": file.read_bytes(), "mask": None,
               "meta": {"defect_type": defect_type}, "source": None, "caption": None, "kind": "images",
               "where": str(file), "mask_where": ""}


def load_mask_pool(kind: str, path: str | None, size: int, skipped: list[str] | None = None) -> MaskPool:
    """Masks by defect type from a folder of PNGs (subfolders name types) or a data set's masks
    (kind files, or dataset and augmented; procedural and learned read none).

    A mask with no defect pixel would label a generated defect with nothing: such files are skipped
    with one warning that counts them (a data set's good samples, empty by design, are skipped silently).
    A truncated or corrupt file is an error naming it, or, given a `skipped` list, noted there.
    """
    if kind in ("procedural", "learned"):
        return {}
    if not path:
        raise ValueError(f"Masks of kind {kind} are read from a path, and none was given.")
    pool: MaskPool = {}
    empty: list[str] = []
    if kind == "files":
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; masks of kind files are read from a folder of "
                                    "mask PNGs.")
        for f in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            image = checked_image(f, str(f), skipped)
            if image is None:
                continue
            mask, _ = fit_defect_mask(image, size)
            if not mask.any():
                empty.append(str(f))
                continue
            defect_type = f.parent.name if f.parent != folder else "*"
            pool.setdefault(defect_type, []).append((mask, str(f), ""))
    else:
        for sample in iter_dataset(path):
            if sample["mask"] is None:
                continue
            image = checked_image(sample["mask"], sample["mask_where"], skipped)
            if image is None:
                continue
            mask, had_defect = fit_defect_mask(image, size)
            if not mask.any():
                if had_defect:
                    empty.append(f"{path}:{sample['key']}")
                continue
            meta = sample["meta"]
            pool.setdefault(meta.get("defect_type", "*"), []).append(
                (mask, f"{path}:{sample['key']}", meta.get("category", "")))
    if not pool and kind != "augmented":  # augmented names the defect type that has none (generate/spec.py)
        first = f" (e.g. {empty[0]})" if empty else ""
        raise ValueError(f"{path} holds no mask with defect pixels{first}; masks are white (> 127) where the "
                         "defect is, so pass mask PNGs or a data set with non-empty defect masks.")
    if empty:
        log.warning("skipped %d mask(s) of %s with no defect pixels (first: %s)", len(empty), path, empty[0])
    return pool


def load_sources(path: str | None, size: int, skipped: list[str] | None = None) -> list[tuple[np.ndarray, str, str]]:
    """Good images for inpainting: a folder of images, or the defect-free samples of a data set.

    Every image (and mask) is decoded here, so a truncated or corrupt file is an error naming it before
    any model loads, or, given a `skipped` list, noted there and left out."""
    if not path:
        raise ValueError("No sources path was given; inpainting needs good images, or a data set's good samples.")
    out = []
    for sample in iter_dataset(path):
        meta = sample["meta"]
        mask = None
        if sample["kind"] != "images" and meta.get("defect_type") != "good" and sample["mask"] is not None:
            mask = checked_image(sample["mask"], sample["mask_where"], skipped)
            if mask is None:
                continue
        is_good = sample["kind"] == "images" or meta.get("defect_type") == "good" or (
            mask is not None and not load_mask(mask).any())
        if is_good:
            image = checked_image(sample["image"], sample["where"], skipped)
            if image is None:
                continue
            out.append((load_rgb(image, size), f"{path}:{sample['key']}", meta.get("category", "")))
    if not out:
        raise ValueError(f"{path} holds no good (defect-free) images to inpaint into; pass a folder of "
                         "images or a data set with defect_type 'good' samples.")
    return out
