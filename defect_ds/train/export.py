"""Exports that stock diffusers loads, and the loader that puts them back into a pipeline.

An export folder holds
    pytorch_lora_weights.safetensors   pipe.load_lora_weights(folder)          (unet_mode=lora)
    unet/                              UNet2DConditionModel.from_pretrained     (unet_mode=full)
    learned_embeds/<token>.safetensors pipe.load_textual_inversion(file), one file per token
    export.json                        base model, tokens per defect type, settings, step
Folders are written under a temporary name and renamed, so a folder that exists is complete.

    python -c "from defect_ds.train.export import read_export_meta; print(read_export_meta('runs/default/export'))"
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from defect_ds.model.mask_gating import enable_mask_gating

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_DIR = "learned_embeds"
META_FILE = "export.json"


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights under diffusers' key names, on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def write_export(out_dir: str | Path, *, meta: dict, lora_state: dict[str, torch.Tensor] | None = None,
                 embeddings: dict[str, torch.Tensor] | None = None,
                 unet: torch.nn.Module | None = None) -> Path:
    """Writes one export folder atomically (temporary name, then rename over any older one)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora_state:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora_state, safe_serialization=True)
    if unet is not None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
    if embeddings:
        (tmp / EMBEDS_DIR).mkdir()
        for token, vectors in embeddings.items():
            save_file({token: vectors.float().contiguous()}, str(tmp / EMBEDS_DIR / f"{token}.safetensors"))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return out_dir


def read_export_meta(export_dir: str | Path) -> dict:
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir} is not a defect-ds export (no {META_FILE}); pass a run's "
                                "export folder such as runs/default/export.")
    return json.loads(path.read_text())


def find_export(path: str | Path) -> Path:
    """An export folder from itself, or from a run directory (its final export, else the newest one)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / "export" / META_FILE).is_file():
        return path / "export"
    steps = sorted(p for p in (path / "exports").glob("step-*") if (p / META_FILE).is_file())
    if steps:
        return steps[-1]
    raise FileNotFoundError(f"{path} holds no export ({META_FILE}); train first or pass an export folder.")


def load_export(pipe, export_dir: str | Path, mask_gating: bool = True, mask_resize: str | None = None) -> dict:
    """Loads LoRA (or full UNet), learned tokens and mask gating into a diffusers SD pipeline.

    mask_resize: how the gate resizes masks; None takes the one the run trained with."""
    from diffusers import UNet2DConditionModel

    export_dir = find_export(export_dir)
    meta = read_export_meta(export_dir)
    if (export_dir / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(export_dir / "unet").to(pipe.device, pipe.unet.dtype)
    if (export_dir / LORA_FILE).is_file():
        pipe.load_lora_weights(export_dir)
        if mask_gating and meta.get("mask_gating", True):
            enable_mask_gating(pipe.unet, mask_resize or meta.get("mask_resize", "nearest"))
    embed_files = sorted((export_dir / EMBEDS_DIR).glob("*.safetensors"))
    if embed_files:
        pipe.load_textual_inversion([str(p) for p in embed_files])
    return meta
