"""What `defect-ds generate` writes: sample folders, training-format shards, and the settings file
that a resumed run must match.

    OUT_DIR/generation.json              the settings the folder was started with
    OUT_DIR/samples/<type>-NNNNNN/       image.png, mask.png, caption.txt, json (+ source.png)
    OUT_DIR/dropped/<type>-NNNNNN/       the same, for pairs --keep-recognisable dropped (`filter.py`)
    OUT_DIR/shards/                      train-NNNNNN.tar + manifest.json, as `defect-ds prepare` writes them
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from defect_ds.data.sample import png_bytes
from defect_ds.data.shards import ShardWriter, build_manifest, write_manifest
from defect_ds.evaluate.metrics import mask_localisation
from defect_ds.generate.spec import GenerationSettings, SampleSpec
from defect_ds.utils.files import atomic_folder, atomic_write_json

SETTINGS_FILE = "generation.json"
IGNORED_ON_RESUME = ("precision",)  # bf16 on a GPU, fp32 on a CPU: a resume may move between them
RESUME_ADVICE = "the finished samples are kept, so free space and rerun the same command to resume"


def sample_done(out_dir: Path, key: str) -> bool:
    """Written, whether kept in samples/ or moved to dropped/ by --keep-recognisable (`filter.py`)."""
    return any((out_dir / folder / key / "json").is_file() for folder in ("samples", "dropped"))


def write_sample(out_dir: Path, spec: SampleSpec, image: np.ndarray, settings: GenerationSettings,
                 raw: np.ndarray | None = None) -> Path:
    """Writes samples/<key>/ under a temporary name and renames it, so a folder that exists is complete."""
    generation = asdict(settings)
    generation.update(prompt=spec.prompt, seed=spec.seed, token=spec.token, mask_origin=spec.mask_origin,
                      source_image=spec.source_origin, **spec.extra)
    if spec.source is not None and raw is not None:  # how well the model alone kept to the mask; after
        # compositing it is 1.0
        generation["mask_localisation_before_composite"] = mask_localisation(raw, spec.source, spec.mask)
    meta = {"category": spec.category, "defect_type": spec.defect_type, "source": "generated",
            "split": "train", "size": list(image.shape[1::-1]), "generation": generation}
    final = out_dir / "samples" / spec.key
    with atomic_folder(final, advice=RESUME_ADVICE) as tmp:
        (tmp / "image.png").write_bytes(png_bytes(Image.fromarray(image)))
        (tmp / "mask.png").write_bytes(png_bytes(Image.fromarray(spec.mask * 255)))
        (tmp / "caption.txt").write_text(spec.prompt)
        if spec.source is not None:
            (tmp / "source.png").write_bytes(png_bytes(Image.fromarray(spec.source)))
        (tmp / "json").write_text(json.dumps(meta, indent=2) + "\n")
    return final


def write_shards(out_dir: Path, tokens: dict[str, str], shard_size: int, extra: dict | None = None) -> list[Path]:
    """Packs every finished sample folder into shards/ in the training format, rewritten whole.

    The shards and manifest come from the data code's own writer, so `read_manifest` and the
    trainer's loader read them like any prepared data set. The new folder is built beside the old
    one and swapped in by renames: a reader sees the old shards or the new ones, never a mix.
    """
    out_dir = Path(out_dir)
    folders = sorted(p.parent for p in (out_dir / "samples").glob("*/json"))
    final = out_dir / "shards"
    with atomic_folder(final, advice=RESUME_ADVICE) as tmp:
        shards = _write_shard_files(tmp, folders, tokens, shard_size, extra)
    return [final / info["name"] for infos in shards.values() for info in infos]


def _write_shard_files(tmp: Path, folders: list[Path], tokens: dict[str, str], shard_size: int,
                       extra: dict | None) -> dict[str, list[dict]]:
    """The shards and manifest of the sample folders, written into `tmp`; returns the shard lists."""
    writer = ShardWriter(tmp, max_samples=shard_size)
    try:
        for folder in folders:
            meta = json.loads((folder / "json").read_text())
            writer.write(meta.get("split", "train"),
                         {"__key__": folder.name, "image.png": (folder / "image.png").read_bytes(),
                          "mask.png": (folder / "mask.png").read_bytes(),
                          "caption.txt": (folder / "caption.txt").read_bytes(),
                          "json": json.dumps(meta, sort_keys=True).encode("utf-8")},
                         meta["defect_type"])
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    categories = sorted({json.loads((f / "json").read_text()).get("category", "") for f in folders} - {""})
    present = {t for infos in shards.values() for info in infos for t in info["counts"]}
    # a token without samples would be added, and never trained, by a run on these shards
    manifest = build_manifest(shards, defect_tokens={t: tok for t, tok in sorted(tokens.items()) if t in present},
                              categories=categories, created_by="defect-ds generate", **(extra or {}))
    write_manifest(tmp, manifest)
    return shards


def check_resume(out_dir: Path, settings: GenerationSettings) -> None:
    """A folder may only be resumed with the settings it was started with; then they are written down.

    A folder without a finished sample holds nothing to mix with, so its old settings (say, from a
    call that stopped before generating) are replaced rather than enforced.
    """
    path = out_dir / SETTINGS_FILE
    current = json.loads(json.dumps(asdict(settings)))
    started = any((out_dir / "samples").glob("*/json"))
    if path.is_file() and started:
        old = json.loads(path.read_text())
        defaults = json.loads(json.dumps(asdict(GenerationSettings())))  # settings added since: their defaults
        for key, value in current.items():
            if key not in IGNORED_ON_RESUME and old.get(key, defaults[key]) != value:
                raise ValueError(f"{out_dir} was generated with {key}={old.get(key)!r}, not {value!r}; resume "
                                 "with the same flags or write to a new folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, current)
