"""What a resume may change, checked against the checkpoint's meta.json before anything is written.

    python -c "from defect_ds.train.resume import TRAINS; print(TRAINS)"

Every committed checkpoint records the config, world size, defect tokens and data fingerprint of the
launch that saved it. A resume that changes what trains (the UNet mode, LoRA rank or targets, the new
tokens) could not load the saved weights and is refused in one sentence naming the fields; one on other
data goes on only with checkpoint.allow_data_change=true, and says so in the log; one on another
world size goes through DeepSpeed's universal checkpoint (`to_universal`).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from defect_ds.config import ConfigError, RunConfig

# what trains: the saved tensors' names and shapes follow from these
TRAINS = ("model.unet_mode", "lora.rank", "lora.target_modules", "textual_inversion.enabled",
          "textual_inversion.vectors_per_token")
# what the data stream is made of, besides the shards' content (data_fingerprint)
DATA = ("data.split", "data.resolution_px", "data.random_crop", "data.hflip", "data.vflip", "data.shuffle_buffer",
        "data.balance", "data.max_repeat", "data.split_by")


@dataclass
class ResumePlan:
    saved_world_size: int  # the world size the checkpoint was saved with
    notes: list[str] = field(default_factory=list)  # what changed and was allowed, for the log


def data_fingerprint(manifest: dict) -> str:
    """The shards' manifest (file names, sizes, counts, tokens) as a short hash: other data, another hash."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def launch_record(cfg: RunConfig, world_size: int, manifest: dict) -> dict:
    """What a checkpoint's meta.json records of the launch that saved it, for `check_resume`."""
    return {"config": cfg.to_dict(), "world_size": world_size, "defect_tokens": manifest.get("defect_tokens", {}),
            "data_fingerprint": data_fingerprint(manifest)}


def check_resume(meta: dict, where: Path, cfg: RunConfig, world_size: int, manifest: dict) -> ResumePlan:
    """Raises ConfigError when this launch cannot or may not continue the checkpoint at `where`."""
    saved = meta.get("config")
    if saved is None:  # saved before checkpoints recorded their launch: the load-time checks remain
        return ResumePlan(world_size)
    new = cfg.to_dict()
    names = [n for n in TRAINS if not n.startswith("lora.") or new["model"]["unet_mode"] == "lora"]
    changed = [f"{n} from {_get(saved, n)!r} to {_get(new, n)!r}" for n in names if _get(saved, n) != _get(new, n)]
    tokens = manifest.get("defect_tokens", {})
    if cfg.textual_inversion.enabled and meta["defect_tokens"] != tokens:
        changed.append(f"the defect tokens from {sorted(meta['defect_tokens'].values())} to {sorted(tokens.values())}")
    if changed:
        raise ConfigError(f"Checkpoint {where} cannot continue with {'; '.join(changed)}, since the saved weights "
                          "would not fit; resume with the checkpoint's values or start a new run in another "
                          "--logging.run_dir.")
    data = [f"{n} from {_get(saved, n)!r} to {_get(new, n)!r}" for n in DATA if _get(saved, n) != _get(new, n)]
    if meta["data_fingerprint"] != data_fingerprint(manifest):
        data.append(f"the shards (now {cfg.data.train_shards}, was {saved['data']['train_shards']})")
    if data and not cfg.checkpoint.allow_data_change:
        raise ConfigError(f"Checkpoint {where} was trained on other data ({'; '.join(data)}); pass "
                          "--checkpoint.allow_data_change=true to continue on the new data, or resume with the old.")
    notes = [f"resuming on changed data ({'; '.join(data)}): checkpoint.allow_data_change=true"] if data else []
    return ResumePlan(int(meta["world_size"]), notes)


def _get(config: dict, name: str):
    section, key = name.split(".")
    return config.get(section, {}).get(key)


def to_universal(ckpt_dir: Path, tag: str, saved_world_size: int, world_size: int) -> Path:
    """Converts checkpoint `tag` with DeepSpeed's ds_to_universal into ckpt_dir/universal/tag, which loads
    on any world size; returns ckpt_dir/universal. Raises ConfigError saying what to run when it fails."""
    out = ckpt_dir / "universal"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(out / tag), "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise ConfigError(f"Checkpoint {ckpt_dir / tag} was saved by {saved_world_size} processes and DeepSpeed "
                          f"could not convert it for {world_size} ({lines[-1]}); resume it on {saved_world_size} "
                          f"processes (deepspeed --num_gpus {saved_world_size} ... --resume {tag}).")
    return out
