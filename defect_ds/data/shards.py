"""Shard writing and the manifest: `{train,val}-NNNNNN.tar` plus `manifest.json`, written atomically.

A shard is written under a hidden temporary name and renamed when complete; the manifest is written
last, also by rename. So a folder with a manifest is complete, and an interrupted run leaves no
`.tar` that looks complete but is not (only `.*.partial` files, which nothing reads).
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import webdataset as wds

from defect_ds.utils.files import atomic_write_json

log = logging.getLogger("defect_ds.data")
MANIFEST = "manifest.json"
FORMAT = "defect-ds-shards/1"
SPLITS = ("train", "val")


class MissingManifestError(FileNotFoundError):
    """The folder holds no complete set of shards."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tar_member_bytes(encoded: dict[str, Any]) -> int:
    """Bytes the files of one sample take inside a tar: a header per file (more for a long name) and the
    content padded to whole 512-byte blocks, as `webdataset.TarWriter` writes them."""
    total = 0
    for name, value in encoded.items():
        if name.startswith("_"):  # metadata such as __key__, which TarWriter does not store
            continue
        info = tarfile.TarInfo(f"{encoded['__key__']}.{name}")
        info.size = len(value)
        total += len(info.tobuf(tarfile.DEFAULT_FORMAT, "utf-8", "surrogateescape"))
        total += -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


def tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar file holding `member_bytes` of members: two zero blocks end the archive, and
    `tarfile` pads the file to whole 10240-byte records, so no shard is smaller than 10 KiB."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes encoded samples into bounded shards per split; `close()` returns the shard list."""

    def __init__(self, out_dir: str | Path, *, max_samples: int = 1000, max_bytes: int = 256 << 20):
        if max_samples < 1 or max_bytes < tarfile.RECORDSIZE:
            raise ValueError(f"Shard bounds max_samples={max_samples}, max_bytes={max_bytes} are invalid; use at "
                             f"least 1 sample and {tarfile.RECORDSIZE} bytes (--shard-max-mb 0.01), the smallest "
                             "tar file.")
        self.out_dir = Path(out_dir)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._open: dict[str, tuple[Path, Any, wds.TarWriter, dict[str, Any]]] = {}

    def write(self, split: str, encoded: dict[str, Any], defect_type: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"Split {split!r} is invalid; use train or val.")
        size = tar_member_bytes(encoded)
        if tar_file_bytes(size) > self.max_bytes:
            log.warning("sample %s alone makes a %d-byte shard, more than the bound of %d bytes; it gets a shard "
                        "of its own", encoded.get("__key__"), tar_file_bytes(size), self.max_bytes)
        current = self._open.get(split)
        if current is not None:
            info = current[3]
            if info["samples"] >= self.max_samples or tar_file_bytes(info["bytes"] + size) > self.max_bytes:
                self._finish(split)
                current = None
        if current is None:
            name = shard_name(split, len(self.shards[split]))
            tmp = self.out_dir / f".{name}.partial"
            stream = open(tmp, "wb")
            info = {"name": name, "samples": 0, "bytes": 0, "counts": Counter()}
            current = self._open[split] = (tmp, stream, wds.TarWriter(stream, mtime=0), info)
        _, _, writer, info = current
        writer.write(encoded)
        info["samples"] += 1
        info["bytes"] += size
        info["counts"][defect_type] += 1

    def _finish(self, split: str) -> None:
        tmp, stream, writer, info = self._open.pop(split)
        writer.close()  # TarWriter does not close a stream it was handed
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(tmp, self.out_dir / info["name"])
        info["bytes"] = (self.out_dir / info["name"]).stat().st_size  # from here on the file size
        info["counts"] = dict(sorted(info["counts"].items()))
        self.shards[split].append(info)

    def close(self) -> dict[str, list[dict[str, Any]]]:
        for split in list(self._open):
            self._finish(split)
        return self.shards

    def abort(self) -> None:
        """Drops the shards being written (an interrupted run); finished shards stay, without a manifest."""
        for tmp, stream, writer, _ in self._open.values():
            writer.close()  # closes the tar stream before the file, so nothing writes to a closed file later
            stream.close()
            tmp.unlink(missing_ok=True)
        self._open.clear()


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """An empty output folder; with overwrite, the manifest goes first so a half-rewrite never reads as done."""
    out = Path(out_dir)
    existing = [p for p in out.glob("*") if p.name == MANIFEST or p.suffix == ".tar" or p.name.endswith(".partial")
                or p.name.startswith(".") and p.name.endswith(".tmp")] if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards or a manifest; choose an empty folder or pass --overwrite.")
    (out / MANIFEST).unlink(missing_ok=True)
    for p in existing:
        p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(out_dir) / MANIFEST
    return atomic_write_json(path, manifest, sort_keys=True)


def build_manifest(shards: dict[str, list[dict[str, Any]]], **extra: Any) -> dict[str, Any]:
    """The manifest: shards per split, counts per split and defect type, plus whatever `extra` records."""
    counts: dict[str, dict[str, int]] = {}
    for split, infos in shards.items():
        total: Counter = Counter()
        for info in infos:
            total.update(info["counts"])
        counts[split] = dict(sorted(total.items()))
    return {"format": FORMAT, "kind": "images", **extra, "counts": counts, "shards": shards}


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder: defect_tokens, counts {split: {type: n}}, shards {split: [...]}."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise MissingManifestError(f"{shards_dir} has no {MANIFEST} (no complete set of shards); run "
                                   f"`defect-ds prepare synthetic {shards_dir}` first.")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `defect-ds prepare`.") from None
    for field in ("defect_tokens", "counts", "shards"):
        if field not in manifest:
            raise ValueError(f"{path} lacks the field {field!r}; re-run `defect-ds prepare`.")
    return manifest
