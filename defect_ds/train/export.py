"""Exports that stock diffusers loads, and the loader that puts them back into a pipeline.

An export folder holds
    pytorch_lora_weights.safetensors   pipe.load_lora_weights(folder)          (unet_mode=lora)
    unet/                              UNet2DConditionModel.from_pretrained     (unet_mode=full)
    learned_embeds/<token>.safetensors pipe.load_textual_inversion(file), one file per token
    export.json                        base model, tokens per defect type, settings, step
Folders are written under a temporary name and renamed, so a folder that exists is complete. A run
writes `exports/step-NNNNNNN/` beside each engine checkpoint (pruned with them) and `export/` at the end.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from defect_ds.config import LoraConfig, ModelConfig, TextualInversionConfig
from defect_ds.model.mask_gating import enable_mask_gating
from defect_ds.model.textual_inversion import learned_embeddings
from defect_ds.utils.files import atomic_folder

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
    """Writes one export folder atomically (temporary name, then rename over any older one); the one
    writer of export.json."""
    from diffusers import StableDiffusionPipeline  # diffusers is slow to import; only writing needs it

    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        if lora_state:
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora_state, safe_serialization=True)
        if unet is not None:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if embeddings:
            (tmp / EMBEDS_DIR).mkdir()
            for token, vectors in embeddings.items():
                save_file({token: vectors.float().contiguous()}, str(tmp / EMBEDS_DIR / f"{token}.safetensors"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_export_meta(export_dir: str | Path) -> dict:
    """The export.json of an export folder: the one reader of the format `Exporter.meta` writes. The
    fields generation acts on are checked here, so a hand-edited file is one sentence, not a traceback
    or (mask_gating "no", a non-empty string) a setting silently taken the other way."""
    path = Path(export_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir} is not a defect-ds export (no {META_FILE}); pass a run's "
                                "export folder such as runs/default/export.")
    fix = "restore the file the run wrote, or export again"
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); {fix}.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a {type(meta).__name__}, not an object of fields; {fix}.")
    tokens = meta.get("tokens", {})
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()):
        raise ValueError(f"{path}: tokens must map each defect type to its token, like {{\"crack\": \"sks_crack\"}}, "
                         f"not {json.dumps(tokens)[:80]}; {fix}.")
    if not isinstance(meta.get("mask_gating", True), bool):
        raise ValueError(f"{path}: mask_gating is {meta['mask_gating']!r}; write true or false (JSON booleans, no "
                         "quotes).")
    if meta.get("mask_resize", "nearest") not in ("nearest", "max"):
        raise ValueError(f"{path}: mask_resize is {meta['mask_resize']!r}; write \"nearest\" or \"max\".")
    resolution = meta.get("resolution_px")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8):
        raise ValueError(f"{path}: resolution_px is {resolution!r}; write the run's resolution in pixels, such as "
                         "512.")
    for field in ("base_model", "unet_mode"):
        if not isinstance(meta.get(field, ""), str):
            raise ValueError(f"{path}: {field} is {meta[field]!r}, not a string; {fix}.")
    return meta


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

    mask_resize: how the gate resizes masks; None takes the one the run trained with, and nearest for
    exports older than the field (they were trained with nearest, the default then)."""
    from diffusers import UNet2DConditionModel

    export_dir = find_export(export_dir)
    meta = read_export_meta(export_dir)
    if (export_dir / "unet").is_dir():
        pipe.unet = UNet2DConditionModel.from_pretrained(export_dir / "unet").to(pipe.device, pipe.unet.dtype)
    if (export_dir / LORA_FILE).is_file():
        check_lora_file(pipe.unet, export_dir / LORA_FILE)
        pipe.load_lora_weights(export_dir)
        if mask_gating and meta.get("mask_gating", True):
            enable_mask_gating(pipe.unet, mask_resize or meta.get("mask_resize", "nearest"))
    embed_files = sorted((export_dir / EMBEDS_DIR).glob("*.safetensors"))
    if embed_files:
        check_embedding_files(pipe.text_encoder, embed_files)
        pipe.load_textual_inversion([str(p) for p in embed_files])
    return meta


# diffusers' and peft's names of the two halves of a LoRA pair
LORA_HALVES = {".lora.down.weight": "down", ".lora_A.weight": "down", ".lora.up.weight": "up", ".lora_B.weight": "up"}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes in a .safetensors file, read from its header without loading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); export it again.") from None


def check_lora_file(unet: torch.nn.Module, path: str | Path) -> None:
    """Every LoRA weight in the file fits the UNet layer it adapts (down: rank x the layer's input, up: the
    layer's output x rank), checked before diffusers loads it: a LoRA of another base model or rank would
    otherwise end in a page of size mismatches, or load in part without a word."""
    path = Path(path)
    layers = dict(unet.named_modules())
    ranks: dict[str, int] = {}
    for key, shape in _tensor_shapes(path).items():
        name = key.removeprefix("unet.")
        suffix = next((s for s in LORA_HALVES if name.endswith(s)), None)
        if suffix is None:  # alphas, text-encoder LoRA: not ours to check
            continue
        layer = name[:-len(suffix)]
        weight = getattr(layers.get(layer), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{path} adapts the layer {layer}, which the base model's UNet does not have; pass "
                             "a LoRA trained on this base model.")
        if LORA_HALVES[suffix] == "down":  # (rank, in) for a linear layer, (rank, in, k, k) for a convolution
            expected = ("rank", *weight.shape[1:])
            fits = len(shape) == weight.ndim and shape[1:] == tuple(weight.shape[1:])
        else:  # (out, rank) or (out, rank, 1, 1)
            expected = (weight.shape[0], "rank", *[1] * (weight.ndim - 2))
            fits = len(shape) == weight.ndim and shape[0] == weight.shape[0]
        rank = shape[0] if LORA_HALVES[suffix] == "down" else shape[1] if len(shape) > 1 else 0
        if not fits:
            raise ValueError(f"{path}: {key} has shape {_shape(shape)}, but the base model's layer {layer} takes "
                             f"{_shape(expected)}; pass a LoRA trained on this base model.")
        if ranks.setdefault(layer, rank) != rank:
            raise ValueError(f"{path}: the two halves of the LoRA of {layer} have ranks {ranks[layer]} and {rank}; "
                             "the file is damaged, so export it again.")


def check_embedding_files(text_encoder: torch.nn.Module, files: list[Path]) -> None:
    """Each learned-token file holds vectors as wide as the text encoder's: (vectors, width) or (width,)."""
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    for path in files:
        if Path(path).suffix != ".safetensors":
            continue
        for key, shape in _tensor_shapes(Path(path)).items():
            if len(shape) not in (1, 2) or shape[-1] != width:
                raise ValueError(f"{path} holds {key!r} of shape {_shape(shape)}, but the base model's text encoder "
                                 f"takes vectors of {width} values, shape (vectors, {width}); pass embeddings "
                                 "trained on this base model.")


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class Exporter:
    """Writes a run's exports: export.json from the run's own sections, weights gathered from the engine."""

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig, ti_cfg: TextualInversionConfig, *,
                 resolution_px: int, defect_tokens: dict[str, str], zero_stage: int, is_main: bool):
        self.model_cfg, self.lora_cfg, self.ti_cfg = model_cfg, lora_cfg, ti_cfg
        self.resolution_px = resolution_px
        self.defect_tokens = defect_tokens if ti_cfg.enabled else {}  # {defect type: token}
        self.zero_stage, self.is_main = zero_stage, is_main

    @property
    def tokens(self) -> list[str]:
        return list(self.defect_tokens.values())

    def meta(self, step: int) -> dict:
        """The content of export.json."""
        return {"base_model": str(Path(self.model_cfg.pretrained_dir).resolve()), "step": step,
                "unet_mode": self.model_cfg.unet_mode, "tokens": self.defect_tokens,
                "vectors_per_token": self.ti_cfg.vectors_per_token, "resolution_px": self.resolution_px,
                "mask_gating": self.model_cfg.unet_mode == "lora" and self.lora_cfg.mask_gating,
                "mask_resize": self.lora_cfg.mask_resize,
                "lora": {"rank": self.lora_cfg.rank, "alpha": self.lora_cfg.alpha,
                         "target_modules": self.lora_cfg.target_modules}}

    def write(self, model, out_dir: Path, step: int) -> None:
        """Every rank calls it (ZeRO-3 gathers collectively); rank 0 writes. `model` has .unet, .text_encoder."""
        export_weights(model, out_dir, meta=self.meta(step), unet_mode=self.model_cfg.unet_mode,
                       tokens=self.tokens, vectors_per_token=self.ti_cfg.vectors_per_token,
                       zero_stage=self.zero_stage, is_main=self.is_main)

    def prune(self, exports_dir: Path, keep: set[str]) -> None:
        """Rank 0 deletes the step exports whose checkpoints are gone (names not in `keep`)."""
        if not self.is_main:
            return
        for old in exports_dir.glob("step-*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)


def _gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full parameter values on every rank for the duration (ZeRO-3 shards them), else a no-op."""
    if zero_stage == 3:
        import deepspeed  # slow to import; generation loads exports without it

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
