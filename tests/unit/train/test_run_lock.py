"""The run directory's lock: one holder, a refusal naming it, and a file left by a dead launch taken over."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from defect_ds.train.run_lock import LOCK_FILE, RunDirLock, RunDirLocked

HOLD = """
import sys, time
from defect_ds.train.run_lock import RunDirLock
RunDirLock.take(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _holder(run_dir):
    """Another process holding the lock, as a second launch would meet it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    run = tmp_path / "run"
    first = _holder(run)
    try:
        with pytest.raises(RunDirLocked) as refusal:
            RunDirLock.take(run)
        message = str(refusal.value)
        assert f"{run} is in use by another launch (pid {first.pid} on host " in message
        assert str(run / LOCK_FILE) in message and "--logging.run_dir" in message
    finally:
        first.kill()
        first.wait()
    # killed, it could not clean up: its file is stale, and the next launch takes it over and says whose it was
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    lock = RunDirLock.take(run)
    assert f"pid {first.pid}" in lock.stale_holder
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    (run / "config.json").write_text("{}")
    lock.release()
    assert not (run / LOCK_FILE).exists() and run.is_dir()


def test_releasing_removes_a_run_directory_the_launch_left_empty(tmp_path):
    lock = RunDirLock.take(tmp_path / "fresh")
    assert lock.stale_holder == ""
    lock.release()
    assert not (tmp_path / "fresh").exists()
    RunDirLock.take(tmp_path / "fresh").release()  # free again
