"""One launch at a time per run directory: rank 0 holds `run_dir/train.lock` (flock) for the whole launch.

    python -c "from defect_ds.train.run_lock import RunDirLock; l = RunDirLock.take('/tmp/r'); print(l.path); l.release()"

The kernel drops a flock when its process ends, however it ends, so the file a dead launch left behind
is free (stale) and the next launch takes it over. The file names its holder (host, pid, start time)
for the message a second launch prints before it writes anything.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "train.lock"


class RunDirLocked(RuntimeError):
    """Another live launch holds the run directory; the message is one sentence for the user."""


class RunDirLock:
    def __init__(self, fd: int, path: Path, stale_holder: str):
        self.fd, self.path = fd, path
        self.stale_holder = stale_holder  # who held the file before, when a dead launch left it; "" if none

    @classmethod
    def take(cls, run_dir: str | Path) -> RunDirLock:
        """Locks `run_dir` (creating it) or raises RunDirLocked naming the holder and the lock file."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirLocked(f"{run_dir} is in use by another launch ({_describe(holder)}, lock file {path}); "
                                   "wait for it to end or stop it, or pass another --logging.run_dir.") from None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder ended and removed the file between our open and lock: take the new one
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n", 0)
        return cls(fd, path, _describe(previous) if previous else "")

    def release(self) -> None:
        """Removes the file, then drops the lock; the run directory goes too if the launch left it empty."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
        try:
            self.path.parent.rmdir()
        except OSError:  # not empty: the usual case
            pass


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a launch that is starting"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"


def lock_for_launch(run_dir: str | Path, is_main: bool) -> RunDirLock | None:
    """Rank 0 locks the run directory for this launch, and every rank raises its refusal, if any."""
    from defect_ds.train.distributed import from_rank0

    lock, refusal = None, None
    if is_main:
        try:
            lock = RunDirLock.take(run_dir)
        except RunDirLocked as e:
            refusal = str(e)
    refusal = from_rank0(refusal)
    if refusal:
        raise RunDirLocked(refusal)
    return lock
