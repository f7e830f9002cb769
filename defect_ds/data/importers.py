"""Importers: MVTec AD folders and generic image folders with a CSV or JSONL manifest; the split.

An importer lists `SourceItem`s (paths and labels, nothing decoded); `load_item` reads one into a
checked `Sample`; `assign_splits` decides train/val, seeded and stratified by defect type.

    defect-ds prepare mvtec /data/mvtec_ad --category pill work/data/mvtec-pill
    defect-ds prepare folder /data/mine/manifest.csv work/data/mine --missing-mask full
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from defect_ds.data.sample import (DEFAULT_MAX_IMAGE_PIXELS, GOOD, BadSampleError, Sample, empty_mask,
                                   full_mask, open_image, sanitise_key, to_binary_mask, to_rgb)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MissingMask = Literal["empty", "full"]
# The text encoder reads 77 tokens (a few hundred characters); a caption far longer is a wrong column or
# a pasted file, and one past csv's field limit (128 KiB) used to end in a traceback.
MAX_CAPTION_CHARS = 1000


@dataclass
class SourceItem:
    key: str
    image_path: Path
    mask_path: Path | None  # None: no mask file (see load_item)
    category: str
    defect_type: str
    caption: str | None = None  # None: made from the caption template of the defect type
    record: dict = field(default_factory=dict)  # more fields for the sample's json record (e.g. ELPV's label)


def mvtec_mask_path(category_dir: Path, defect_type: str, stem: str) -> Path:
    """Where MVTec AD keeps the mask of test/<defect_type>/<stem>.png (read here, written by data/mvtec.py)."""
    return category_dir / "ground_truth" / defect_type / f"{stem}_mask.png"


def mvtec_items(root: str | Path, category: str) -> list[SourceItem]:
    """All images of one MVTec AD category: train/good, test/good and test/<defect> with ground_truth masks."""
    base = Path(root) / category
    if not (base / "test").is_dir():
        known = sorted(p.name for p in Path(root).iterdir() if (p / "test").is_dir()) if Path(root).is_dir() else []
        raise FileNotFoundError(f"{base} is not an MVTec AD category folder (no test/); categories under {root}: "
                                f"{', '.join(known) or 'none'}.")
    items = []
    for split_dir in ("train", "test"):
        for type_dir in sorted(p for p in (base / split_dir).glob("*") if p.is_dir()):
            defect_type = type_dir.name
            for image_path in sorted(type_dir.iterdir()):
                if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                mask_path = None
                if defect_type != GOOD:
                    # a missing ground-truth file is a bad input, reported by load_item
                    mask_path = mvtec_mask_path(base, defect_type, image_path.stem)
                key = sanitise_key(f"mvtec-{category}-{split_dir}-{defect_type}-{image_path.stem}")
                items.append(SourceItem(key, image_path, mask_path, category, defect_type))
    if not items:
        raise FileNotFoundError(f"{base} holds no images under train/*/ or test/*/; check the MVTec AD layout.")
    return items


def folder_items(manifest_path: str | Path, default_category: str = "object") -> list[SourceItem]:
    """Rows of a CSV (header: image, defect_type[, mask, caption, category, key]) or JSONL manifest.

    Paths are relative to the manifest's folder. `defect_type` "good" marks a defect-free image. An empty
    mask cell means "no mask" (see `load_item`). An empty caption cell of a CSV, like a missing or null
    JSONL caption, means "no caption given: use the template"; a caption that is given but blank (JSONL
    `""`, or spaces in either format) is a bad input.
    """
    path = Path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"Folder manifest {path} does not exist; give a .csv or .jsonl file.")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            try:  # a CSV cannot tell an empty cell from a missing one, so an empty caption cell is no caption
                rows = [dict(row, caption=row.get("caption") or None) for row in reader]
            except csv.Error as e:  # a cell past csv's field limit, or a NUL byte
                raise ValueError(f"{path} line {reader.reader.line_num} cannot be read as CSV ({e}); captions may be at "
                                 f"most {MAX_CAPTION_CHARS} characters, so fix that line.") from None
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path} line {n} is not valid JSON ({e}); fix that line.") from None
    else:
        raise ValueError(f"Folder manifest {path} must end in .csv or .jsonl.")
    items, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{path} row {n}"
        if not row.get("image"):
            raise ValueError(f"{where} has no image; every row needs an image path.")
        if not row.get("defect_type"):
            raise ValueError(f"{where} has no defect_type; use a defect name or good.")
        image_path = path.parent / row["image"]
        mask_path = path.parent / row["mask"] if row.get("mask") else None
        key = sanitise_key(row.get("key") or f"{Path(row['image']).with_suffix('')}")
        if key in seen:
            raise ValueError(f"{where}: key {key!r} repeats an earlier row; give rows unique image paths or keys.")
        seen.add(key)
        caption = row["caption"] if "caption" in row and row["caption"] is not None else None
        if caption is not None and len(str(caption)) > MAX_CAPTION_CHARS:
            raise ValueError(f"{where} has a caption of {len(str(caption))} characters, more than the "
                             f"{MAX_CAPTION_CHARS} allowed (the text encoder reads 77 tokens); shorten it.")
        items.append(SourceItem(key, image_path, mask_path, row.get("category") or default_category,
                                str(row["defect_type"]), caption))
    if not items:
        raise ValueError(f"Folder manifest {path} lists no images; add rows.")
    return items


def load_item(item: SourceItem, caption: str, *, missing_mask: MissingMask | None,
              max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Sample:
    """Reads and checks one source item; RGB image, binary mask of the same size, non-empty caption.

    A defect-free (good) item without a mask gets an empty mask. A defect item without a mask gets an
    empty or all-ones mask only if `missing_mask` says which; otherwise it is a bad input.
    """
    image = to_rgb(open_image(item.image_path, str(item.image_path), max_pixels))
    if item.mask_path is not None:
        if not item.mask_path.is_file():
            raise BadSampleError(f"The mask {item.mask_path} of {item.image_path} does not exist; add it or "
                                 "remove the image.")
        mask = to_binary_mask(open_image(item.mask_path, str(item.mask_path), max_pixels))
        if mask.size != image.size:
            raise BadSampleError(f"The mask {item.mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                                 f"{item.image_path} is {image.size[0]}x{image.size[1]}; give a mask of the "
                                 "image's size.")
        mask_source = "file"
    elif item.defect_type == GOOD:
        mask, mask_source = empty_mask(image.size), "none:empty"
    elif missing_mask is None:
        raise BadSampleError(f"{item.image_path} ({item.defect_type}) has no mask; add one, or pass "
                             "--missing-mask full (whole image is the defect) or --missing-mask empty.")
    else:
        mask = full_mask(image.size) if missing_mask == "full" else empty_mask(image.size)
        mask_source = f"none:{missing_mask}"
    if not caption.strip():
        raise BadSampleError(f"{item.image_path} has an empty caption; give a caption or drop the caption "
                             "field so the defect type's template is used.")
    record = {**item.record, "category": item.category, "defect_type": item.defect_type,
              "source": str(item.image_path), "mask_source": mask_source}
    return Sample(item.key, image, mask, caption.strip(), record)


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction} is invalid: use a value in [0, 1).")


def assign_splits(items: list[tuple[str, str]], *, val_fraction: float, seed: int) -> dict[str, str]:
    """(key, defect_type) pairs -> {key: "train" | "val"}: per defect type, round(n x val_fraction) keys
    chosen by a seeded shuffle go to val, always leaving at least one in train. Independent of input order."""
    check_val_fraction(val_fraction)
    by_type: dict[str, list[str]] = defaultdict(list)
    for key, defect_type in items:
        by_type[defect_type].append(key)
    splits = {}
    for defect_type, keys in sorted(by_type.items()):
        keys = sorted(keys)
        type_seed = int.from_bytes(hashlib.sha256(f"{seed}:{defect_type}".encode()).digest()[:8], "little")
        random.Random(type_seed).shuffle(keys)
        n_val = min(round(len(keys) * val_fraction), len(keys) - 1)
        for i, key in enumerate(keys):
            splits[key] = "val" if i < n_val else "train"
    return splits
