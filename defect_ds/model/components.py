"""Loads and checks the Stable Diffusion parts of any local diffusers folder, and decides what trains.

    python -c "from defect_ds.model.components import check_model_dir; print(check_model_dir('models/tiny-defect-base'))"
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from defect_ds.config import LoraConfig, ModelConfig

# What a Stable Diffusion folder must hold, and why each piece is needed.
REQUIRED_FILES = {
    "model_index.json": "the pipeline index",
    "unet/config.json": "the UNet config",
    "vae/config.json": "the VAE config",
    "text_encoder/config.json": "the text encoder config",
    "scheduler/scheduler_config.json": "the noise scheduler config",
}
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
UNET_MODES = ("lora", "full", "frozen")


@dataclass
class Components:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object


def check_model_dir(path: str | Path) -> Path:
    """Raises FileNotFoundError naming the first missing piece of a diffusers SD folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Model folder {path} does not exist; set model.pretrained_dir to a local "
                                f"diffusers Stable Diffusion folder or make one with "
                                f"`defect-ds make-tiny-model {path}`.")
    for rel, what in REQUIRED_FILES.items():
        if not (path / rel).is_file():
            raise FileNotFoundError(f"Model folder {path} lacks {rel} ({what}); it is not a complete "
                                    f"diffusers Stable Diffusion folder.")
    for sub, names in WEIGHT_FILES.items():
        if not any((path / sub / n).is_file() or (path / sub / (n + ".index.json")).is_file() for n in names):
            raise FileNotFoundError(f"Model folder {path} has no {sub} weights ({' or '.join(names)}).")
    if not any(all((path / "tokenizer" / f).is_file() for f in group) for group in TOKENIZER_FILES):
        raise FileNotFoundError(f"Model folder {path} has no tokenizer files (tokenizer/tokenizer.json, "
                                f"or tokenizer/vocab.json with merges.txt).")
    try:
        json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'model_index.json'} is not valid JSON ({e}).") from None
    return path


def load_components(cfg: ModelConfig, zero3_config: dict | None = None) -> Components:
    """Loads UNet, VAE, text encoder, tokenizer and the DDPM training scheduler, all frozen, fp32.
    zero3_config: a ZeRO-3 DeepSpeed config; the UNet is then partitioned as it loads (`load_unet_partitioned`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_model_dir(cfg.pretrained_dir)
    if zero3_config is not None and (path / "unet" / WEIGHT_FILES["unet"][0]).is_file():
        unet = load_unet_partitioned(path, zero3_config)
    else:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def load_unet_partitioned(path: Path, zero3_config: dict) -> nn.Module:
    """The UNet of a model folder with every weight partitioned across the ranks as it is made
    (`deepspeed.zero.Init`), then filled one tensor at a time from the safetensors file: no rank holds the
    whole UNet at any time, where `from_pretrained` would put all of it on every rank before the engine
    partitions it (for SD 1.5, 3.4 GB of fp32 per rank at start-up; docs/scaling.md). Rank 0 reads each
    tensor and DeepSpeed scatters it. torch's random state is left as it was, so adapters and tokens drawn
    after this are the same as after `from_pretrained`."""
    import deepspeed
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    file = path / "unet" / WEIGHT_FILES["unet"][0]
    config = UNet2DConditionModel.load_config(path, subfolder="unet")
    with torch.random.fork_rng(devices=[]), deepspeed.zero.Init(config_dict_or_path=zero3_config):
        unet = UNet2DConditionModel.from_config(config)  # random weights, each partitioned as its module ends
    params = dict(unet.named_parameters())
    writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    with safe_open(file, framework="pt") as weights:
        names = sorted(weights.keys())
        missing, unexpected = sorted(set(params) - set(names)), sorted(set(names) - set(params))
        if missing or unexpected:
            raise ValueError(f"{file} does not match its config.json: {len(missing)} weights missing "
                             f"({', '.join(missing[:3]) or 'none'}) and {len(unexpected)} unexpected "
                             f"({', '.join(unexpected[:3]) or 'none'}).")
        for name in names:
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if writer:
                    params[name].data.copy_(weights.get_tensor(name))
    return unet


def add_lora(unet: nn.Module, cfg: LoraConfig) -> None:
    """Adds peft LoRA adapters to the UNet (the layout diffusers saves and loads)."""
    from peft import LoraConfig as PeftLoraConfig

    unet.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                    target_modules=list(cfg.target_modules), init_lora_weights="gaussian"))


def set_trainable(unet: nn.Module, text_encoder: nn.Module, unet_mode: str) -> list[nn.Parameter]:
    """The one place that decides what trains; returns the trainable parameters (fp32).

    lora: only the adapter weights of the UNet; full: every UNet weight; frozen: nothing of the UNet.
    Learned token vectors (textual inversion) are parameters of their own embedding wrapper and
    always train when present; the rest of the text encoder and the whole VAE never train.
    """
    set_unet_trainable(unet, unet_mode)
    text_encoder.requires_grad_(False)
    for name, p in text_encoder.named_parameters():
        if name.endswith("token_embedding.learned_vectors"):
            p.requires_grad_(True)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    for p in params:
        if not hasattr(p, "ds_id"):  # partitioned (ZeRO-3): DeepSpeed keeps the fp32 master of its part
            p.data = p.data.float()
    return params


def set_unet_trainable(unet: nn.Module, unet_mode: str) -> None:
    """The UNet's part of `set_trainable`; FLOP counting calls it alone on a meta-device UNet."""
    if unet_mode not in UNET_MODES:
        raise ValueError(f"model.unet_mode={unet_mode!r} is invalid: use lora, full or frozen.")
    unet.requires_grad_(unet_mode == "full")
    if unet_mode == "lora":
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, 77) of captions, padded and cut to the text encoder's context, as training sees them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def unet_param_count(unet_config: dict) -> int:
    """Parameters of a UNet built from its config on the meta device (no memory allocated)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    return sum(p.numel() for p in unet.parameters())
