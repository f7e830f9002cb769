"""DeepSpeed engine checkpoints with a commit marker, retention and exact resume.

Layout under the run directory:
    checkpoints/step-0000100/   engine state (ZeRO shards, optimizer, LR schedule, client state)
    checkpoints/step-0000100/COMMITTED   written last, by rank 0, after every rank finished saving
A checkpoint folder without COMMITTED (an interrupted save) is never resumed from. The file logic
(`commit`, `prune`, `committed_checkpoints`, `find_resume_tag`) needs no process group.

    python -c "from pathlib import Path; from defect_ds.train.checkpoint import find_resume_tag as f; \
print(f(Path('runs/default/checkpoints'), 'latest'))"
"""
from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


COMMIT_MARKER = "COMMITTED"
LOW_SPACE_BYTES = 64 << 20  # a failed write with less free space than this is taken as a full disk


class CheckpointWriteError(OSError):
    """This rank could not write its part of a checkpoint; the message is one sentence for the user."""


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def committed_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step-*") if (p / COMMIT_MARKER).is_file())


def find_resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    """The checkpoint tag to resume from: None to start fresh."""
    if not resume:
        return None
    if resume == "latest":
        done = committed_checkpoints(ckpt_dir)
        return done[-1].name if done else None
    if not (ckpt_dir / resume / COMMIT_MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: {ckpt_dir / resume} is not a committed "
                                f"checkpoint; use latest or one of "
                                f"{[p.name for p in committed_checkpoints(ckpt_dir)] or 'none yet'}.")
    return resume


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int,
                    is_main: bool) -> Path:
    """Every rank saves its shards; then rank 0 commits and prunes old checkpoints."""
    tag = tag_for(step)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        raise CheckpointWriteError(write_failure_message(e, ckpt_dir, step)) from None
    dist.barrier()  # every rank's files are on disk before the marker says so
    if is_main:
        try:
            commit(ckpt_dir, step)
        except OSError as e:
            raise CheckpointWriteError(write_failure_message(e, ckpt_dir, step)) from None
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return ckpt_dir / tag


def write_failure_message(error: BaseException, ckpt_dir: Path, step: int) -> str:
    """One sentence for a checkpoint write that failed: what, where, what is safe, what to do. The step's
    folder has no commit marker, so resuming never takes it."""
    done = committed_checkpoints(ckpt_dir)
    kept = (f"the last committed checkpoint is step {int(done[-1].name.split('-')[1])} and intact" if done
            else "no checkpoint was committed yet")
    if _disk_full(error, ckpt_dir):
        return (f"No space left while saving step {step} in {ckpt_dir}; {kept}; free space and resume with "
                "--resume latest.")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"Could not write the checkpoint of step {step} in {ckpt_dir} ({reason}); {kept}; fix the folder "
            "and resume with --resume latest.")


def _disk_full(error: BaseException, ckpt_dir: Path) -> bool:
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    try:  # torch's zip writer ("unexpected pos ...") hides the errno: look at the free space instead
        return shutil.disk_usage(ckpt_dir).free < LOW_SPACE_BYTES
    except OSError:
        return False


def commit(ckpt_dir: Path, step: int) -> None:
    """Marks the checkpoint of `step` complete; call it only once every rank has saved. Written under a
    temporary name and renamed, so a full disk can never leave an empty marker that looks committed."""
    marker = ckpt_dir / tag_for(step) / COMMIT_MARKER
    partial = marker.with_name(COMMIT_MARKER + ".partial")
    partial.write_text(f"{step}\n")
    partial.replace(marker)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keeps the newest `keep_last` committed checkpoints and deletes the others, and every interrupted
    save older than the newest commit (a newer uncommitted one may still be being written)."""
    done = committed_checkpoints(ckpt_dir)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step-*"):
        if done and not (stale / COMMIT_MARKER).exists() and stale.name < done[-1].name:
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: Path, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise FileNotFoundError(f"DeepSpeed could not load {ckpt_dir / tag}; the checkpoint is incomplete.")
    return client_state
