"""Files and folders that appear complete or not at all: written under a temporary name in the same
folder, flushed to disk, then renamed over the final name. A full disk becomes one sentence.

    python -c "from defect_ds.utils.files import atomic_folder, atomic_write_json; import pathlib, tempfile; \\
d = pathlib.Path(tempfile.mkdtemp()); atomic_write_json(d / 'x.json', {'a': 1})
with atomic_folder(d / 'x') as tmp: (tmp / 'a').write_text('a')"
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; str() is one sentence for the user."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


LOW_SPACE_BYTES = 64 << 20  # a failed write with less free space than this is taken as a full disk


def is_disk_full(error: BaseException, where: str | Path | None = None) -> bool:
    """Whether a write failed on a full disk or quota. Some writers hide the errno (torch's zip writer says
    "file write failed", safetensors a bare I/O error): for their errors, given `where`, low free space
    there counts too."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    writer_error = isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"
    if where is None or not writer_error:
        return False
    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def disk_full_message(path: str | Path, advice: str = "free space and rerun") -> str:
    """The sentence for a write that found the disk full; it says what was left as it was, as training does
    for checkpoints ("No space left while saving step ...")."""
    return f"No space left while writing {path}; nothing there was changed; {advice}."


@contextlib.contextmanager
def disk_full_as_sentence(path: str | Path, advice: str = "free space and rerun") -> Iterator[None]:
    """Turns a full disk inside the block into DiskFullError naming `path`; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # torch's writer reports a full disk as RuntimeError, safetensors as its own error
        if not is_disk_full(e, path):
            raise
        raise DiskFullError(disk_full_message(path, advice)) from None


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", advice: str = "free space and rerun") -> Iterator[IO]:
    """Yields a file open for writing under a temporary name beside `path`; when the block ends without an
    error it is flushed to disk and renamed to `path`, so a reader sees the old file or the new one,
    never a cut one. On any error the temporary file is deleted and `path` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', not {mode!r}.")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # the pid: two writers never share one
    try:
        with disk_full_as_sentence(path, advice), open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, advice: str = "free space and rerun") -> Path:
    with atomic_file(path, "wb", advice) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """JSON (indent 2 unless `dumps` says otherwise) and a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(data, **{"indent": 2, **dumps}) + "\n")


@contextlib.contextmanager
def atomic_folder(final: Path, advice: str = "free space and rerun") -> Iterator[Path]:
    """Yields an empty temporary folder beside `final`; when the block ends without an error, the
    folder replaces `final` (any older one is renamed away first and then deleted), so a reader sees
    the old folder or the new one, never a mix. After an error the temporary folder is left, hidden,
    and the next call clears it; a full disk in the block is a DiskFullError naming `final` and ending in
    `advice`."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_as_sentence(final, advice):
        tmp.mkdir(parents=True)
        yield tmp
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


FINGERPRINT_CHUNKS = 64  # evenly spaced 64 KiB reads per weight file: any retrained weights change them


def folder_fingerprint(folder: str | Path, ignore_config_keys: tuple[str, ...] = ()) -> str:
    """A fingerprint of a model folder: its configs and weight files (name, size and evenly spaced chunks of
    their bytes). Reading chunks instead of whole files keeps it under a second for SD 1.5's 4 GB while any
    other weights still differ. `ignore_config_keys` leaves those keys of each config.json out (such as
    diffusers' `_name_or_path`, which says where a model was loaded from, not what it is)."""
    root = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "scheduler_config.json")))
    for path in files:
        if ignore_config_keys and path.name == "config.json":
            config = {k: v for k, v in json.loads(path.read_text()).items() if k not in ignore_config_keys}
            digest.update(f"{path.relative_to(root).as_posix()}:{json.dumps(config, sort_keys=True)}\n".encode())
            continue
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}:{size}\n".encode())
        with open(path, "rb") as f:
            chunk = 1 << 16
            for i in range(FINGERPRINT_CHUNKS if size > chunk else 1):
                f.seek(i * max(0, size - chunk) // max(1, FINGERPRINT_CHUNKS - 1))
                digest.update(f.read(chunk))
    return digest.hexdigest()[:16]
