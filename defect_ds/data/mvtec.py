"""The MVTec AD folder layout, which anomalib and other inspection tools read, and `defect-ds export mvtec`,
which writes any data set (a `defect-ds generate` folder, shards) in it.

    defect-ds export mvtec work/generated work/generated-mvtec --good work/downstream/shots

    OUT/<category>/train/good/NNN.png                     defect-free images (MVTec trains on good only)
    OUT/<category>/test/good/NNN.png                      defect-free images of a val or test split
    OUT/<category>/test/<defect_type>/NNN.png             every defect image
    OUT/<category>/ground_truth/<defect_type>/NNN_mask.png  its mask: 0 or 255, the image's size
    OUT/index.csv                                         each file's sample key, caption and origin

`defect-ds prepare mvtec OUT --category C` reads the tree back (`importers.mvtec_items`).
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from defect_ds.data.importers import mvtec_mask_path
from defect_ds.data.reader import iter_dataset, load_mask, load_rgb
from defect_ds.data.sample import GOOD, png_bytes, sanitise_key
from defect_ds.utils.files import atomic_folder

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("category", "split", "defect_type", "image", "mask", "key", "caption", "origin")


def write_mvtec(data: str | Path, out: str | Path, *, good: str | Path | None = None, category: str = "object",
                overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Writes the samples of `data` (and the good ones of `good` in data's categories) as an MVTec AD tree
    in `out`; returns {category: {folder: images}}. Good samples of a val or test split go to test/good,
    other good ones to train/good, defects to test/<defect_type> with their masks. `category` names
    samples that carry none. The tree is written under a temporary name and renamed, so `out` is
    complete or absent."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new folder or pass --overwrite.")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows = []
    with atomic_folder(out) as tmp:
        sources = [(data, False)] + ([(good, True)] if good else [])
        for source, good_only in sources:
            for sample in iter_dataset(source):
                meta = sample["meta"]
                defect_type = meta.get("defect_type", GOOD)
                cat = sanitise_key(meta.get("category") or category)
                if good_only and (defect_type != GOOD or cat not in counts):
                    continue  # only good images of the categories DATA holds
                if defect_type == GOOD:
                    split = "test" if meta.get("split") in ("val", "test") else "train"
                    folder = sanitise_key(GOOD)
                else:
                    split, folder = "test", sanitise_key(defect_type)
                stem = f"{counts[cat][f'{split}/{folder}']:03d}"
                counts[cat][f"{split}/{folder}"] += 1
                image = load_rgb(sample["image"])
                image_file = tmp / cat / split / folder / f"{stem}.png"
                image_file.parent.mkdir(parents=True, exist_ok=True)
                image_file.write_bytes(png_bytes(Image.fromarray(image)))
                mask_file = None
                if defect_type != GOOD:
                    mask_file = mvtec_mask_path(tmp / cat, folder, stem)
                    mask_file.parent.mkdir(parents=True, exist_ok=True)
                    mask_file.write_bytes(png_bytes(Image.fromarray(_mask_255(sample, image.shape[:2]))))
                rows.append({"category": cat, "split": split, "defect_type": folder,
                             "image": image_file.relative_to(tmp).as_posix(),
                             "mask": mask_file.relative_to(tmp).as_posix() if mask_file else "",
                             "key": sample["key"], "caption": sample["caption"] or "", "origin": sample["where"]})
        if not rows:
            raise ValueError(f"{data} holds no samples; pass a `defect-ds generate` folder or a shards folder.")
        for cat in counts:  # MVTec tools look for it even when there is nothing to put in it
            (tmp / cat / "train" / GOOD).mkdir(parents=True, exist_ok=True)
        with (tmp / INDEX_FILE).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return {cat: dict(folders) for cat, folders in counts.items()}


def read_index(out: str | Path) -> list[dict[str, str]]:
    """The rows of an exported tree's index.csv (INDEX_COLUMNS)."""
    with (Path(out) / INDEX_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


def _mask_255(sample: dict, image_hw: tuple[int, int]) -> np.ndarray:
    """The sample's mask as MVTec stores it: uint8 0/255 of the image's size."""
    if sample["mask"] is None:
        raise ValueError(f"{sample['where']} is a {sample['meta'].get('defect_type')} image without a mask; "
                         "MVTec AD needs a ground-truth mask for every defect image.")
    mask = load_mask(sample["mask"])
    if mask.shape != tuple(image_hw):
        raise ValueError(f"{sample['mask_where']} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                         f"{image_hw[1]}x{image_hw[0]}; a mask must have its image's size.")
    return mask.astype(np.uint8) * 255


def add_command(sub: argparse._SubParsersAction) -> None:
    """Adds `defect-ds export mvtec DATA OUT`."""
    export = sub.add_parser("export", help="write a data set in another tool's layout",
                            description="Write a data set in another tool's layout.")
    export_sub = export.add_subparsers(dest="layout", required=True)
    p = export_sub.add_parser("mvtec", help="the MVTec AD tree (anomalib and other inspection tools)",
                              description="Write a data set as an MVTec AD tree: <category>/train/good, "
                                          "test/<defect_type>/NNN.png, ground_truth/<defect_type>/NNN_mask.png.")
    p.add_argument("data", help="a `defect-ds generate` folder, a shards folder or any data set defect-ds reads")
    p.add_argument("out", help="the MVTec AD root to write (<category>/train, test, ground_truth)")
    p.add_argument("--good", help="a data set whose good images of DATA's categories to add (train/good, or "
                   "test/good for its val split)")
    p.add_argument("--category", default="object", help="category of samples that name none")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    counts = write_mvtec(args.data, args.out, good=args.good, category=args.category, overwrite=args.overwrite)
    for cat, folders in sorted(counts.items()):
        print(f"{Path(args.out) / cat}: " + ", ".join(f"{n} {folder}" for folder, n in sorted(folders.items())))
    if not any(folder == "train/good" for folders in counts.values() for folder in folders):
        print("note: no good images, so train/good is empty; most MVTec tools train on it (add --good DATA).")
    return 0
