"""DeepSpeed engine checkpoints with a commit marker, retention and exact resume.

Layout under the run directory:
    checkpoints/step-0000100/   engine state (ZeRO shards, optimizer, LR schedule, client state)
    checkpoints/step-0000100/meta.json   step, size, save time and the base model's fingerprint
    checkpoints/step-0000100/COMMITTED   written last, by rank 0, after every rank finished saving
A checkpoint folder without COMMITTED (an interrupted save) is never resumed from. The file logic
(`commit`, `prune`, `committed_checkpoints`, `find_resume_tag`) needs no process group.

Checkpoints are lean: only what trains (LoRA, token vectors, or the UNet in full mode) with its
optimizer state, the schedule, RNG and data position. The frozen base is not saved (for SD 1.5 it
was 3.94 GB beside a 6.2 MB LoRA); a resume loads it from model.pretrained_dir again and refuses to
go on when that folder's fingerprint differs from the one the checkpoint recorded.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from defect_ds.config import ConfigError
from defect_ds.utils.files import folder_fingerprint, is_disk_full


COMMIT_MARKER = "COMMITTED"
META_FILE = "meta.json"


class CheckpointWriteError(OSError):
    """This rank could not write its part of a checkpoint; the message is one sentence for the user."""


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def step_of(tag: str) -> int:
    return int(tag.split("-")[1])


def read_meta(folder: Path) -> dict:
    """A checkpoint's meta.json; {} for one saved without it."""
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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


def base_fingerprint(pretrained_dir: str | Path) -> str:
    """A fingerprint of the frozen base a lean checkpoint leaves out (`utils.files.folder_fingerprint`)."""
    return folder_fingerprint(pretrained_dir)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int,
                    is_main: bool, record: dict | None = None) -> Path:
    """Every rank saves what trains (no frozen weights); then rank 0 writes meta.json (with `record`, what
    a resume checks its launch against), commits and prunes old checkpoints."""
    tag = tag_for(step)
    start = time.perf_counter()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        raise CheckpointWriteError(write_failure_message(e, ckpt_dir, step)) from None
    dist.barrier()  # every rank's files are on disk before the marker says so
    if is_main:
        try:
            meta = {"step": step, "save_s": round(time.perf_counter() - start, 3),
                    "bytes": folder_bytes(ckpt_dir / tag), "base_fingerprint": client_state.get("base_fingerprint"),
                    "trained_parameters": len(client_state.get("trained_parameters", [])), **(record or {})}
            (ckpt_dir / tag / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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
    kept = (f"the last committed checkpoint is step {step_of(done[-1].name)} and intact" if done
            else "no checkpoint was committed yet")
    if is_disk_full(error, ckpt_dir):  # also where torch's zip writer hides the errno
        return (f"No space left while saving step {step} in {ckpt_dir}; {kept}; free space and resume with "
                "--resume latest.")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"Could not write the checkpoint of step {step} in {ckpt_dir} ({reason}); {kept}; fix the folder "
            "and resume with --resume latest.")


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


def load_checkpoint(engine, ckpt_dir: Path, tag: str, *, base_fingerprint: str,
                    trained_parameters: list[str]) -> dict:
    """Loads what trains over the frozen base already in `engine` (from model.pretrained_dir), after
    checking that base and the set of trained parameters are the ones the checkpoint was saved with.
    `ckpt_dir` may be the universal copy `resume.to_universal` made."""
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True, load_module_strict=False)
    if client_state is None:
        raise FileNotFoundError(f"DeepSpeed could not load {ckpt_dir / tag}; the checkpoint is incomplete.")
    check_same_base(client_state, ckpt_dir / tag, base_fingerprint, trained_parameters)
    return client_state


def check_same_fingerprint(saved: str | None, where: Path, base_fingerprint: str) -> None:
    if saved != base_fingerprint:
        raise ConfigError(f"Checkpoint {where} was trained on a base model with fingerprint {saved}, but "
                         f"model.pretrained_dir now has {base_fingerprint}; point model.pretrained_dir at the "
                         f"model the run started from.")


def check_same_base(client_state: dict, where: Path, base_fingerprint: str, trained_parameters: list[str]) -> None:
    """Raises ConfigError when a lean checkpoint would be put on another base model or another set of
    trained parameters (which a non-strict load would otherwise accept in silence)."""
    check_same_fingerprint(client_state.get("base_fingerprint"), where, base_fingerprint)
    saved_names = client_state.get("trained_parameters")
    if saved_names != trained_parameters:
        missing = sorted(set(trained_parameters) - set(saved_names or []))[:3]
        extra = sorted(set(saved_names or []) - set(trained_parameters))[:3]
        raise ConfigError(f"Checkpoint {where} trained other parameters than this config does (missing "
                         f"{missing}, extra {extra}); resume with the run's own config.json.")
