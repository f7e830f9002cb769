"""`defect-ds prepare {synthetic,mvtec,folder,elpv}`: source images -> checked samples -> shards + manifest.

    defect-ds prepare synthetic work/data/synthetic/shards
    defect-ds prepare mvtec /data/mvtec_ad --category pill work/data/mvtec-pill
    defect-ds prepare folder /data/mine/manifest.csv work/data/mine --missing-mask full
    defect-ds prepare elpv work/data/elpv --resolution-px 256
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from defect_ds.data import elpv, importers, latents, synthetic
from defect_ds.data.captions import (DEFAULT_TOKEN_PREFIX, caption_for, defect_tokens, parse_token_overrides,
                                     read_templates)
from defect_ds.data.sample import DEFAULT_MAX_IMAGE_PIXELS, GOOD, BadSampleError, Sample
from defect_ds.data.shards import SPLITS, ShardWriter, build_manifest, prepare_out_dir, write_manifest
from defect_ds.utils.files import atomic_file


@dataclass
class Job:
    """One sample to write: its key and defect type are known before anything is decoded."""

    key: str
    defect_type: str
    source: str  # file path or description, for error messages and the skip report
    load: Callable[[], Sample]  # reads and checks it; raises BadSampleError


@dataclass
class WriteOptions:
    val_fraction: float = 0.1  # share of each defect type that goes to val
    seed: int = 0  # seeds the split (and the synthetic drawing)
    max_samples_per_shard: int = 1000
    max_bytes_per_shard: int = 256 << 20
    skip_bad: bool = False  # skip and count bad inputs instead of stopping at the first
    overwrite: bool = False
    progress: bool = True


def write_dataset(jobs: list[Job], out_dir: str | Path, options: WriteOptions, **manifest_extra: Any
                  ) -> dict[str, Any]:
    """Loads and checks every job, splits the ones that loaded, writes them; returns the manifest (written last).

    Splitting after loading keeps the split stratified over what is written: with --skip-bad, splitting
    first could send every val pick of a defect type to the skip list. Each job is decoded and encoded
    once; the encoded samples wait in an anonymous temporary file next to the output until the split is
    known.
    """
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"Two inputs map to the sample key {duplicate!r}; give them distinct names.")
    importers.check_val_fraction(options.val_fraction)  # now, not after the slow loading pass
    out = prepare_out_dir(out_dir, options.overwrite)
    writer = ShardWriter(out, max_samples=options.max_samples_per_shard, max_bytes=options.max_bytes_per_shard)
    skipped: list[dict[str, str]] = []
    written: list[dict[str, str]] = []
    try:
        with tempfile.TemporaryFile(dir=out) as spool:  # no name: nothing is left behind if interrupted
            loaded: list[Job] = []
            for job in _progress(jobs, options.progress, f"reading {len(jobs)} inputs"):
                try:
                    encoded = job.load().encode()
                except BadSampleError as e:
                    if not options.skip_bad:
                        raise BadSampleError(f"{e} (pass --skip-bad to skip bad inputs and count them)") from None
                    skipped.append({"key": job.key, "source": job.source, "reason": str(e)})
                    continue
                pickle.dump(encoded, spool, protocol=pickle.HIGHEST_PROTOCOL)  # our own bytes, read back below
                loaded.append(job)
            splits = importers.assign_splits([(j.key, j.defect_type) for j in loaded],
                                             val_fraction=options.val_fraction, seed=options.seed)
            spool.seek(0)
            for job in _progress(loaded, options.progress, f"writing {out}"):
                split = splits[job.key]
                writer.write(split, _with_split(pickle.load(spool), split), job.defect_type)
                written.append({"key": job.key, "defect_type": job.defect_type, "split": split,
                                "source": job.source})
        shards = writer.close()
    except BaseException:
        writer.abort()  # the interrupted shard disappears; finished ones stay, and no manifest says "done"
        raise
    if not any(shards.values()):
        raise ValueError(f"No sample of {out} could be written ({len(skipped)} skipped); fix the inputs.")
    with atomic_file(out / "splits.jsonl") as f:  # the split, written down
        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in written)
    manifest = build_manifest(shards, split={"seed": options.seed, "val_fraction": options.val_fraction,
                                             "stratified_by": "defect_type", "file": "splits.jsonl"},
                              skipped=skipped, **manifest_extra)
    write_manifest(out, manifest)
    return manifest


def _with_split(encoded: dict[str, Any], split: str) -> dict[str, Any]:
    """The encoded sample with `split` added to its json record (known only after every input loaded)."""
    record = json.loads(encoded["json"])
    record["split"] = split
    return dict(encoded, json=json.dumps(record, sort_keys=True).encode("utf-8"))


def _progress(items: list, enabled: bool, description: str):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, console=_stderr_console(), transient=False)


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


def report(manifest: dict[str, Any], out_dir: str | Path) -> None:
    """Counts per split and defect type, shards and skips, as a table on stderr."""
    from rich.table import Table

    counts = manifest["counts"]
    types = sorted({t for split in counts.values() for t in split})
    table = Table(title=f"{out_dir}")
    table.add_column("defect type")
    table.add_column("token")
    for split in SPLITS:
        table.add_column(split, justify="right")
    for t in types:
        table.add_row(t, manifest["defect_tokens"].get(t, "-"), *(str(counts.get(s, {}).get(t, 0)) for s in SPLITS))
    console = _stderr_console()
    console.print(table)
    shards = manifest["shards"]
    console.print(f"shards: {', '.join(f'{len(shards[s])} {s}' for s in SPLITS)}; "
                  f"skipped bad inputs: {len(manifest['skipped'])}")
    for skip in manifest["skipped"][:20]:
        console.print(f"  skipped {skip['source']}: {skip['reason']}", markup=False)
    mask_note = manifest.get("missing_masks")
    if mask_note:
        console.print(mask_note, markup=False)


# ---- the sources --------------------------------------------------------------------------------
def synthetic_jobs(*, resolution_px: int, per_defect: int, good_per_category: int, seed: int,
                   tokens: dict[str, str], templates: dict[str, str], categories: tuple[str, ...]) -> list[Job]:
    return [Job(synthetic.sample_key(c, t, i), t, f"synthetic {c} {t} {i}",
                partial(synthetic.make_sample, c, t, i, resolution_px=resolution_px, seed=seed, tokens=tokens,
                        templates=templates))
            for c, t, i in synthetic.plan(per_defect=per_defect, good_per_category=good_per_category,
                                          categories=categories)]


def item_jobs(items: list[importers.SourceItem], tokens: dict[str, str], templates: dict[str, str],
              missing_mask: importers.MissingMask | None, max_pixels: int, resolution_px: int | None = None
              ) -> list[Job]:
    def load(item: importers.SourceItem) -> Sample:
        caption = item.caption if item.caption is not None else caption_for(item.category, item.defect_type,
                                                                             tokens, templates)
        sample = importers.load_item(item, caption, missing_mask=missing_mask, max_pixels=max_pixels)
        return sample if resolution_px is None else sample.resized(resolution_px)

    return [Job(item.key, item.defect_type, str(item.image_path), partial(load, item)) for item in items]


def _tokens(args: argparse.Namespace, defect_types: list[str]) -> dict[str, str]:
    return defect_tokens(defect_types, args.token_prefix, parse_token_overrides(args.token))


def _options(args: argparse.Namespace) -> WriteOptions:
    return WriteOptions(val_fraction=args.val_fraction, seed=args.seed, max_samples_per_shard=args.shard_max_samples,
                        max_bytes_per_shard=int(args.shard_max_mb * (1 << 20)), skip_bad=args.skip_bad,
                        overwrite=args.overwrite, progress=not args.no_progress)


def run_synthetic(args: argparse.Namespace) -> int:
    tokens = _tokens(args, list(synthetic.DEFECT_TYPES))
    templates = read_templates(args.caption_templates)
    categories = tuple(args.categories.split(","))
    jobs = synthetic_jobs(resolution_px=args.resolution_px, per_defect=args.per_defect,
                          good_per_category=args.good_per_category, seed=args.seed, tokens=tokens,
                          templates=templates, categories=categories)
    manifest = write_dataset(jobs, args.out, _options(args), created_by="prepare synthetic", defect_tokens=tokens,
                             caption_templates=templates, categories=list(categories),
                             resolution_px=args.resolution_px)
    report(manifest, args.out)
    return 0


def run_mvtec(args: argparse.Namespace) -> int:
    items = importers.mvtec_items(args.root, args.category)
    if args.max_good is not None:
        good = [i for i in items if i.defect_type == GOOD]
        items = [i for i in items if i.defect_type != GOOD] + good[:args.max_good]
    tokens = _tokens(args, sorted({i.defect_type for i in items}))
    templates = read_templates(args.caption_templates)
    jobs = item_jobs(items, tokens, templates, None, args.max_image_pixels)
    manifest = write_dataset(jobs, args.out, _options(args), created_by="prepare mvtec",
                             source={"root": str(args.root), "category": args.category}, defect_tokens=tokens,
                             caption_templates=templates, categories=[args.category])
    report(manifest, args.out)
    return 0


def run_folder(args: argparse.Namespace) -> int:
    items = importers.folder_items(args.manifest, args.category)
    tokens = _tokens(args, sorted({i.defect_type for i in items}))
    templates = read_templates(args.caption_templates)
    jobs = item_jobs(items, tokens, templates, args.missing_mask, args.max_image_pixels)
    unmasked = sum(1 for i in items if i.mask_path is None and i.defect_type != GOOD)
    note = ""
    if unmasked and args.missing_mask:
        what = "an all-ones mask (the whole image is the defect)" if args.missing_mask == "full" else "an empty mask"
        note = f"{unmasked} defect image(s) had no mask and got {what} (--missing-mask={args.missing_mask})."
    manifest = write_dataset(jobs, args.out, _options(args), created_by="prepare folder",
                             source={"manifest": str(args.manifest)}, defect_tokens=tokens,
                             caption_templates=templates, categories=sorted({i.category for i in items}),
                             missing_masks=note)
    report(manifest, args.out)
    return 0


def run_elpv(args: argparse.Namespace) -> int:
    if args.resolution_px < 8:
        raise ValueError(f"--resolution-px {args.resolution_px} is too small; use 8 or more (ELPV cells are 300).")
    root = Path(args.elpv_dir) if args.elpv_dir else elpv.default_root()
    items, left_out = elpv.elpv_items(root, args.defect_threshold, args.uncertain)
    tokens = _tokens(args, [elpv.DEFECT])
    templates = read_templates(args.caption_templates) or elpv.TEMPLATES
    jobs = item_jobs(items, tokens, templates, "full", args.max_image_pixels, args.resolution_px)
    n_defect = sum(1 for i in items if i.defect_type == elpv.DEFECT)
    note = (f"{n_defect} defect cells (probability >= {args.defect_threshold}) got full masks (image-level "
            "labels); " + (f"{left_out} uncertain cells were left out." if args.uncertain == "drop"
                           else "uncertain cells count as good."))
    manifest = write_dataset(jobs, args.out, _options(args), created_by="prepare elpv",
                             source={"root": str(root), "labels": elpv.LABELS}, defect_tokens=tokens,
                             caption_templates=templates, categories=list(elpv.CELL_TYPES),
                             resolution_px=args.resolution_px, missing_masks=note,
                             labels={"defect_threshold": args.defect_threshold, "uncertain": args.uncertain,
                                     "uncertain_left_out": left_out})
    report(manifest, args.out)
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser("prepare", help="turn images and masks into training shards",
                                    description=__doc__.splitlines()[0])
    prepare_sub = prepare.add_subparsers(dest="source", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("out", help="output folder for {train,val}-NNNNNN.tar and manifest.json")
        p.add_argument("--seed", type=int, default=0, help="seeds the train/val split (and synthetic drawing)")
        p.add_argument("--val-fraction", type=float, default=0.1, help="share of each defect type put in val")
        p.add_argument("--shard-max-samples", type=int, default=1000, help="samples per shard at most")
        p.add_argument("--shard-max-mb", type=float, default=256.0, help="MiB per shard at most")
        p.add_argument("--token-prefix", default=DEFAULT_TOKEN_PREFIX, help="token = prefix + defect type")
        p.add_argument("--token", action="append", metavar="TYPE=TOKEN", help="token of one defect type")
        p.add_argument("--caption-templates", metavar="JSON",
                       help='file {"scratch": "a photo of a {category} with a {token}", "*": ...}')
        p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="larger images are refused as decompression bombs")
        p.add_argument("--skip-bad", action="store_true", help="skip bad inputs and count them instead of stopping")
        p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = prepare_sub.add_parser("synthetic", help="draw the embedded procedural defect data set")
    common(p)
    p.add_argument("--resolution-px", type=int, default=128, help="image side in pixels")
    p.add_argument("--per-defect", type=int, default=12, help="images per category and defect type")
    p.add_argument("--good-per-category", type=int, default=12, help="defect-free images per category")
    p.add_argument("--categories", default=",".join(synthetic.CATEGORIES), help="comma-separated")
    p.set_defaults(func=run_synthetic)

    p = prepare_sub.add_parser("mvtec", help="import one category of an MVTec AD folder")
    p.add_argument("root", help="MVTec AD root (holding <category>/train, test, ground_truth)")
    p.add_argument("--category", required=True, help="e.g. pill")
    p.add_argument("--max-good", type=int, default=None, help="keep at most this many defect-free images")
    common(p)
    p.set_defaults(func=run_mvtec)

    p = prepare_sub.add_parser("folder", help="import images listed in a CSV or JSONL manifest")
    p.add_argument("manifest", help="CSV (header image,defect_type[,mask,caption,category,key]) or JSONL")
    common(p)
    p.add_argument("--category", default="object", help="category of rows that name none")
    p.add_argument("--missing-mask", choices=["empty", "full"], default=None,
                   help="mask of a defect image listed without one (default: that is an error)")
    p.set_defaults(func=run_folder)
    p = prepare_sub.add_parser("elpv", help="import the ELPV solar cells (image-level labels, no masks)")
    p.add_argument("elpv_dir", nargs="?", default=None,
                   help=f"folder holding labels.csv and images/ (default: the installed elpv_dataset; "
                        f"{elpv.INSTALL_HINT})")
    common(p)
    p.add_argument("--resolution-px", type=int, default=300, help="image side in pixels (ELPV cells are 300)")
    p.add_argument("--defect-threshold", type=float, default=elpv.DEFAULT_DEFECT_THRESHOLD,
                   help="a cell is defect at this defect probability or above, good at 0")
    p.add_argument("--uncertain", choices=["drop", "good"], default="drop",
                   help="cells between 0 and the threshold: left out (default) or counted as good (as Deitsch et "
                        "al. count them)")
    p.set_defaults(func=run_elpv)
    latents.add_prepare_command(prepare_sub)
