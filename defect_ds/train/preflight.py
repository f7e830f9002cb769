"""Every input of a run checked before the model loads and before anything is written to the run dir.

A launch that fails here (a missing model folder, data that yields no full batch, latents another codec
encoded, a DeepSpeed file that contradicts the run config, a resume tag that is not committed) stops in
seconds with one sentence and leaves an existing run's config.json, metrics.jsonl and tensorboard/ as they
were. No process group is needed: every rank reads the same files and reaches the same verdict.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from defect_ds.config import ConfigError, RunConfig
from defect_ds.data.latents import check_codec
from defect_ds.data.loader import plan_epoch
from defect_ds.data.shards import read_manifest
from defect_ds.model.components import check_model_dir
from defect_ds.train import checkpoint as ckpt
from defect_ds.train.distributed import build_ds_config, zero_stage
from defect_ds.train.resume import ResumePlan, check_resume


@dataclass
class RunInputs:
    ds_config: dict  # the DeepSpeed config with the batch arithmetic injected
    manifest: dict  # the training shards' manifest
    batches_per_epoch: int  # full micro batches every rank yields per epoch
    resume_tag: str | None  # the committed checkpoint to resume from, None to start fresh
    base_fingerprint: str  # of model.pretrained_dir, which a lean checkpoint records and a resume checks
    resume: ResumePlan | None = None  # with resume_tag: its world size and the allowed changes to log


def check_run_inputs(cfg: RunConfig, world_size: int) -> RunInputs:
    """Reads and checks the model folder, the data, the batch arithmetic, the DeepSpeed file, the resume
    tag and what the resume changes; raises ConfigError, ValueError or FileNotFoundError with one sentence
    naming what and where."""
    ds_config = build_ds_config(cfg.train.ds_config, cfg.train, cfg.optimizer, world_size)
    check_model_dir(cfg.model.pretrained_dir)
    manifest = read_manifest(cfg.data.train_shards)
    check_codec(manifest, cfg.data.train_shards, cfg.model.pretrained_dir)
    per_rank = plan_epoch(cfg.data, world_size).samples_per_rank
    micro = cfg.train.micro_batch_size
    if per_rank < micro:
        raise ConfigError(f"train.micro_batch_size={micro} is larger than the {per_rank} {cfg.data.split} "
                          f"samples each of {world_size} rank(s) gets from {cfg.data.train_shards}; lower "
                          f"train.micro_batch_size to {max(per_rank, 1)} or less, or add data.")
    ckpt_dir = Path(cfg.logging.run_dir) / "checkpoints"
    resume_tag = ckpt.find_resume_tag(ckpt_dir, cfg.checkpoint.resume)
    fingerprint = ckpt.base_fingerprint(cfg.model.pretrained_dir)
    plan = None
    if resume_tag:
        meta = ckpt.read_meta(ckpt_dir / resume_tag)
        if "base_fingerprint" in meta:
            ckpt.check_same_fingerprint(meta["base_fingerprint"], ckpt_dir / resume_tag, fingerprint)
        plan = check_resume(meta, ckpt_dir / resume_tag, cfg, world_size, manifest)
        if plan.saved_world_size != world_size and zero_stage(ds_config) > 0:  # partitioned optimizer state
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return RunInputs(ds_config, manifest, per_rank // micro, resume_tag, fingerprint, plan)
