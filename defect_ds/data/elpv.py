"""ELPV solar cells (Deitsch et al. 2019): 300x300 electroluminescence images with image-level labels.

    defect-ds prepare elpv work/data/elpv

`labels.csv` lists one cell a line, `images/cellNNNN.png  <defect probability>  <mono|poly>`, the
probability one of 0, 1/3, 2/3 and 1 (the experts' confidence that the cell is defective). A cell is
`defect` at or above the threshold and `good` at 0; the cells in between are uncertain and left out of
both sides unless `uncertain="good"` (docs/elpv.md, Threshold). There are no masks: a defect cell gets a
full mask (the whole cell is the defect), a good cell an empty one. The cell type is the category.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from defect_ds.data.importers import SourceItem
from defect_ds.data.sample import GOOD, sanitise_key

LABELS = "labels.csv"
CELL_TYPES = ("mono", "poly")
PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)
DEFECT = "defect"
# 0.5 is Deitsch et al.'s binarisation (2/3 and 1 are defective), so `all-real` reads against their 88%;
# the 1/3 cells, which the experts thought more likely functional but were unsure of, are left out.
DEFAULT_DEFECT_THRESHOLD = 0.5
INSTALL_HINT = "pip install 'defect-ds[elpv]' (or elpv-dataset)"
TEMPLATES = {GOOD: "an electroluminescence image of a {category} solar cell",
             "*": "an electroluminescence image of a {category} solar cell with {token}"}
Uncertain = Literal["drop", "good"]


@dataclass(frozen=True)
class Cell:
    image_path: Path
    cell_type: str
    probability: float


def default_root() -> Path:
    """The data folder of the installed `elpv_dataset` package (its labels.csv and images/)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"The ELPV data set is not installed; {INSTALL_HINT}, or give ELPV_DIR, a "
                                f"folder holding {LABELS} and images/.")
    return Path(spec.origin).parent / "data"


def read_labels(root: str | Path) -> list[Cell]:
    """Every line of ROOT/labels.csv, checked: three fields, a known probability and cell type, an image
    that exists, no image twice. Raises ValueError naming the line otherwise."""
    path = Path(root) / LABELS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give ELPV_DIR, a folder holding {LABELS} and images/ "
                                f"(or {INSTALL_HINT} and leave ELPV_DIR out).")
    cells, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{where} has {len(fields)} fields; each line is `images/NAME.png PROBABILITY "
                             "mono|poly`.")
        name, probability_text, cell_type = fields
        try:
            probability = float(probability_text)
        except ValueError:
            probability = math.nan
        if not any(math.isclose(probability, p, abs_tol=1e-6) for p in PROBABILITIES):
            raise ValueError(f"{where} has the unknown label {probability_text!r}; ELPV's defect probabilities "
                             "are 0, 1/3, 2/3 and 1.")
        if cell_type not in CELL_TYPES:
            raise ValueError(f"{where} has the unknown cell type {cell_type!r}; use mono or poly.")
        image_path = Path(root) / name
        if not image_path.is_file():
            raise ValueError(f"{where} names {image_path}, which does not exist; restore it or remove the line.")
        if name in seen:
            raise ValueError(f"{where} lists {name} a second time; list each image once.")
        seen.add(name)
        cells.append(Cell(image_path, cell_type, probability))
    if not cells:
        raise ValueError(f"{path} lists no cells; each line is `images/NAME.png PROBABILITY mono|poly`.")
    return cells


def check_threshold(defect_threshold: float) -> None:
    if not 0 < defect_threshold <= 1:
        raise ValueError(f"--defect-threshold {defect_threshold} is invalid; use a probability in (0, 1], e.g. "
                         f"{DEFAULT_DEFECT_THRESHOLD}.")


def defect_type_of(probability: float, defect_threshold: float, uncertain: Uncertain) -> str | None:
    """`defect` at or above the threshold, `good` at 0 (and below the threshold with uncertain="good"),
    None (left out) in between."""
    if probability >= defect_threshold - 1e-9:
        return DEFECT
    if probability < 1e-9 or uncertain == "good":
        return GOOD
    return None


def elpv_items(root: str | Path, defect_threshold: float = DEFAULT_DEFECT_THRESHOLD,
               uncertain: Uncertain = "drop") -> tuple[list[SourceItem], int]:
    """The cells labelled good or defect, with their cell type and probability in the record, and how
    many were left out as uncertain. Refuses a set that ends up with one class."""
    check_threshold(defect_threshold)
    items, left_out = [], 0
    for cell in read_labels(root):
        defect_type = defect_type_of(cell.probability, defect_threshold, uncertain)
        if defect_type is None:
            left_out += 1
            continue
        key = sanitise_key(f"elpv-{cell.image_path.stem}")
        items.append(SourceItem(key, cell.image_path, None, cell.cell_type, defect_type,
                                record={"cell_type": cell.cell_type,
                                        "defect_probability": round(cell.probability, 4)}))
    classes = {item.defect_type for item in items}
    if classes != {GOOD, DEFECT}:
        have = " and ".join(sorted(classes)) or "no"
        raise ValueError(f"{Path(root) / LABELS} gives {have} cells only at --defect-threshold {defect_threshold} "
                         f"({left_out} uncertain left out); a classifier needs good and defect cells, so use "
                         "another threshold or a complete labels file.")
    return items, left_out
