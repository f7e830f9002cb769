"""Folders that appear complete or not at all: written under a temporary name, then renamed.

    python -c "from defect_ds.utils.files import atomic_folder; import pathlib, tempfile
with atomic_folder(pathlib.Path(tempfile.mkdtemp()) / 'x') as tmp: (tmp / 'a').write_text('a')"
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `final`; when the block ends without an error, the
    folder replaces `final` (any older one is renamed away first and then deleted), so a reader sees
    the old folder or the new one, never a mix. After an error the temporary folder is left, hidden,
    and the next call clears it."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
