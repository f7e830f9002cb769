"""DeepSpeed engine checkpoints with a commit marker, retention, exact resume, and gathered exports.

Layout under the run directory:
    checkpoints/step-0000100/   engine state (ZeRO shards, optimizer, LR schedule, client state)
    checkpoints/step-0000100/COMMITTED   written last, by rank 0, after every rank finished saving
    exports/step-0000100/       LoRA + embeddings at that step (see export.py)
    export/                     the final export
A checkpoint folder without COMMITTED (an interrupted save) is never resumed from.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from defect_ds.model.textual_inversion import learned_embeddings
from defect_ds.train.export import lora_state_dict, write_export

COMMIT_MARKER = "COMMITTED"


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
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are on disk before the marker says so
    if is_main:
        (ckpt_dir / tag / COMMIT_MARKER).write_text(f"{step}\n")
        done = committed_checkpoints(ckpt_dir)
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob("step-*"):  # interrupted saves older than the newest commit
            if not (stale / COMMIT_MARKER).exists() and stale.name < done[-1].name:
                shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def load_checkpoint(engine, ckpt_dir: Path, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise FileNotFoundError(f"DeepSpeed could not load {ckpt_dir / tag}; the checkpoint is incomplete.")
    return client_state


def _gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full parameter values on every rank for the duration (ZeRO-3 shards them), else a no-op."""
    import contextlib

    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def export_weights(model, out_dir: Path, *, meta: dict, unet_mode: str, tokens: list[str],
                   vectors_per_token: int, zero_stage: int, is_main: bool) -> None:
    """Gathers trainable weights (all ranks take part under ZeRO-3) and rank 0 writes the export."""
    unet, text_encoder = model.unet, model.text_encoder
    params = [p for p in unet.parameters() if unet_mode == "full" or p.requires_grad]
    params += [p for p in text_encoder.parameters() if p.requires_grad]
    with _gathered(params, zero_stage):
        if is_main:
            lora = lora_state_dict(unet) if unet_mode == "lora" else None
            embeds = learned_embeddings(text_encoder, tokens, vectors_per_token) if tokens else None
            if lora is not None and any(v.numel() == 0 for v in lora.values()):
                raise RuntimeError("A gathered LoRA weight is empty; the ZeRO-3 gather did not run.")
            write_export(out_dir, meta=meta, lora_state=lora, embeddings=embeds,
                         unet=unet if unet_mode == "full" else None)
    dist.barrier()
