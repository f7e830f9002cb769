"""The few-shot split: per defect type, a few images are all the generator may learn from; every other
defect image, and a share of the good images, is the segmenter's test set. The shots of a type are
taken in turn from each category (object kind) it occurs on, in a key-hashed order, so they cover the
categories evenly and the same arguments give the same split.

    defect-ds downstream split work/data/synthetic work/downstream --shots 4
    defect-ds downstream split work/data/elpv work/elpv-split --shots 24 --pool-fraction 0.5

OUT/shots/ holds the shots and the training good images as training shards (for `train.py`, and the
good images that generation inpaints into and the arms mix in); OUT/test/ holds the test set (as val-NNNNNN.tar shards);
OUT/pool/ holds the --pool-fraction share of the non-shot defect images on the training side, for
the `all-real` arm alone (never a shot, never a test image). OUT/split.json lists the keys of each side.
No key is on two sides, and the command checks it.
"""
from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path

from defect_ds.data.sample import GOOD
from defect_ds.data.shards import ShardWriter, build_manifest, prepare_out_dir, read_manifest, write_manifest
from defect_ds.data.reader import iter_dataset
from defect_ds.utils.files import atomic_write_json

SPLIT_FILE = "split.json"


def _hashed(keys: list[str], seed: int) -> list[str]:
    """A stable, key-hashed order: the same key keeps its place whatever else is in the list."""
    return sorted(keys, key=lambda k: (zlib.crc32(f"{seed}:{k}".encode()), k))


def _round_robin(keys: list[str], groups: dict[str, str], seed: int) -> list[str]:
    """Keys taken in turn from each group (sorted by name), each group in hashed order."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for k in _hashed(keys, seed):
        by_group[groups.get(k, "")].append(k)
    queues = [by_group[g] for g in sorted(by_group)]
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


Sides = dict[str, list[str]]  # defect type -> keys


def choose(items_by_type: dict[str, list[str]], shots: int | None, test_good_fraction: float,
           seed: int = 0, groups: dict[str, str] | None = None, pool_fraction: float = 0.0
           ) -> tuple[Sides, Sides, Sides]:
    """(shot keys, test keys, pool keys) per defect type. Shots are taken in turn from each group (`groups`:
    key -> category), then `pool_fraction` of the rest, also in turn, go to the pool; the others are test
    images. Good images: every one not sent to the test set trains."""
    train: Sides = {}
    test: Sides = {}
    pool: Sides = {}
    for defect_type, keys in sorted(items_by_type.items()):
        keys = sorted(keys)
        if defect_type == GOOD:
            # the same good image lands on the same side for any --shots
            ordered = _hashed(keys, seed)
            n_test = round(len(keys) * test_good_fraction)
            test[GOOD], train[GOOD] = sorted(ordered[:n_test]), sorted(ordered[n_test:])
            continue
        if len(keys) < 2:
            raise ValueError(f"Defect type {defect_type!r} has {len(keys)} image(s); the split needs at least 2 "
                             "(one to learn from, one to test on). Add images or leave the type out.")
        n = shots if shots is not None else max(1, len(keys) // 3)
        if not 1 <= n < len(keys):
            raise ValueError(f"--shots {n} leaves no test image of {defect_type!r} ({len(keys)} images); "
                             f"use 1 to {len(keys) - 1}.")
        n_pool = min(round((len(keys) - n) * pool_fraction), len(keys) - n - 1)  # one test image at least
        ordered = _round_robin(keys, groups or {}, seed)
        train[defect_type], pool[defect_type] = sorted(ordered[:n]), sorted(ordered[n:n + n_pool])
        test[defect_type] = sorted(ordered[n + n_pool:])
    sides = [{k for ks in side.values() for k in ks} for side in (train, test, pool)]
    overlap = (sides[0] & sides[1]) | (sides[0] & sides[2]) | (sides[1] & sides[2])
    if overlap:  # keys are unique per data set, so this guards the code above, not the input
        raise AssertionError(f"keys on two sides of the split: {sorted(overlap)[:5]}")
    return train, test, {t: keys for t, keys in pool.items() if keys}


def _encoded(item: dict, split: str) -> dict:
    meta = dict(item["meta"], split=split)
    return {"__key__": item["key"], "image.png": item["image"], "mask.png": item["mask"],
            "caption.txt": item["caption"].encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode()}


def split_dataset(data: str | Path, out: str | Path, *, shots: int | None = None, test_good_fraction: float = 0.5,
                  pool_fraction: float = 0.0, val_good: int = 2, overwrite: bool = False) -> dict:
    """Writes OUT/shots, OUT/test, OUT/pool (empty without pool_fraction) and OUT/split.json; returns the record."""
    source_manifest = read_manifest(data)
    if not 0 < test_good_fraction < 1:
        raise ValueError(f"--test-good-fraction {test_good_fraction} must be between 0 and 1.")
    if not 0 <= pool_fraction < 1:
        raise ValueError(f"--pool-fraction {pool_fraction} must be at least 0 and below 1 (every type keeps a test "
                         "image).")
    items = list(iter_dataset(data))
    if any(item["mask"] is None or item["caption"] is None for item in items):
        raise ValueError(f"{data} has samples without mask.png or caption.txt; split training shards "
                         "made by `defect-ds prepare`.")
    by_type: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_type[item["meta"].get("defect_type", "unknown")].append(item["key"])
    if GOOD not in by_type:
        raise ValueError(f"{data} has no good images; the test set and the arms need some.")
    if not set(by_type) - {GOOD}:
        raise ValueError(f"{data} has good images only; the split needs defect images to learn from and test on.")
    categories = {item["key"]: str(item["meta"].get("category", "")) for item in items}
    train, test, pool = choose(by_type, shots, test_good_fraction, groups=categories, pool_fraction=pool_fraction)
    side = ({k: "shots" for ks in train.values() for k in ks} | {k: "test" for ks in test.values() for k in ks}
            | {k: "pool" for ks in pool.values() for k in ks})
    val_keys = set(train[GOOD][:val_good])  # a few good images for train.py's val loss, never a shot
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {name: ShardWriter(prepare_out_dir(out / name, overwrite)) for name in ("shots", "test", "pool")}
    try:
        for item in items:
            name = side[item["key"]]
            # the test folder is one held-out set: its shards are val-NNNNNN.tar
            split = "val" if item["key"] in val_keys or name == "test" else "train"
            writers[name].write(split, _encoded(item, split), item["meta"].get("defect_type", "unknown"))
        for name, writer in writers.items():
            write_manifest(out / name, build_manifest(
                writer.close(), created_by=f"downstream split ({name})", source={"data": str(data)},
                defect_tokens=source_manifest["defect_tokens"],
                caption_templates=source_manifest.get("caption_templates", {}),
                categories=source_manifest.get("categories", [])))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record = {"data": str(data), "shots_per_type": {t: len(k) for t, k in train.items() if t != GOOD},
              "shots": train, "test": test, "pool": pool, "test_good_fraction": test_good_fraction,
              "pool_fraction": pool_fraction}
    atomic_write_json(out / SPLIT_FILE, record, sort_keys=True)
    return record
