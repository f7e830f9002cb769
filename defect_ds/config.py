"""Typed run configuration: dataclasses, file loading, `--section.field=value` overrides, validation.

Precedence is command line > config file > defaults. Every component receives only its own section.
The loader is generic: `defect-ds generate` and `pretrain-base` read their own root dataclasses
(`generate/spec.py`, `pretrain/recipe.py`) with it, their older flags being aliases of fields.

    python -c "from defect_ds.config import load_config; print(load_config('configs/default.toml'))"
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from defect_ds.model.lora_targets import TEXT_SIDE_TARGETS


class ConfigError(ValueError):
    """A bad setting; the message is one sentence naming the field, the value and the fix."""


@dataclass
class ModelConfig:
    pretrained_dir: str = "work/tiny-sd"  # local diffusers Stable Diffusion folder (tiny or real SD 1.5)
    unet_mode: Literal["lora", "full", "frozen"] = "lora"  # what of the UNet trains
    activation_checkpointing: bool = True  # recompute UNet blocks in backward to save memory
    # NHWC memory format for the UNet's frozen convolutions (a GPU lever). On this CPU it did not pay:
    # an SD 1.5 step at 256 px in bf16 ran at 0.96x of NCHW (benchmarks/results/step-*-latents-layout.md)
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNet

    def validate(self) -> None:
        if not self.pretrained_dir:
            raise ConfigError("model.pretrained_dir is empty; set it to a local diffusers model folder "
                              "(make one with `defect-ds make-tiny-model DIR`).")


@dataclass
class LoraConfig:
    rank: int = 8  # LoRA rank r
    alpha: float = 8.0  # LoRA alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA input
    # Module-name suffixes that get adapters. The default adapts every layer that acts on spatial
    # tokens, so a zero mask is exactly the base model; adding attn2.to_k / attn2.to_v (text side,
    # never gated) lets the adapters reach every position through cross-attention.
    target_modules: list[str] = field(default_factory=lambda: [
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"])
    mask_gating: bool = True  # gate adapter updates on spatial tokens by the defect mask
    # How the mask reaches each attention layer's token grid: max marks a token when any pixel of its
    # patch is defect, so thin scratches survive coarse grids; nearest samples one pixel per token (the
    # old default: 22 of 33 synthetic masks vanish at 8x8). Exports record it and generation follows.
    mask_resize: Literal["nearest", "max"] = "max"

    def validate(self) -> None:
        require(self.rank >= 1, "lora.rank", self.rank, "use a positive integer such as 8")
        require(self.alpha > 0, "lora.alpha", self.alpha, "use a positive number such as the rank")
        require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "use a value in [0, 1)")
        require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
                "name at least one module suffix such as to_q")


@dataclass
class TextualInversionConfig:
    enabled: bool = True  # learn one new token per defect type
    vectors_per_token: int = 1  # embedding vectors behind each new token
    initializer_word: str = "defect"  # word whose embedding initialises every new token
    learning_rate: float = 5e-3  # learning rate of the new embedding vectors

    def validate(self) -> None:
        require(self.vectors_per_token >= 1, "textual_inversion.vectors_per_token",
                self.vectors_per_token, "use 1 or more")
        require(self.learning_rate > 0, "textual_inversion.learning_rate", self.learning_rate,
                "use a positive number such as 5e-3")
        require(bool(self.initializer_word.strip()), "textual_inversion.initializer_word",
                self.initializer_word, "use a single word such as defect")


@dataclass
class DataConfig:
    train_shards: str = "work/data/synthetic"  # folder of {train,val}-NNNNNN.tar shards
    split: str = "train"  # which shards of that folder to stream
    resolution_px: int = 64  # training resolution (square)
    random_crop: bool = False  # random instead of centre crop after resizing the short side
    hflip: bool = True  # random horizontal flips (image and mask together)
    vflip: bool = False  # random vertical flips (image and mask together)
    shuffle_buffer: int = 256  # samples in the seeded shuffle buffer
    num_workers: int = 0  # DataLoader worker processes per rank
    bad_sample_policy: Literal["warn", "fail"] = "warn"  # what a corrupt sample does at load time
    balance: Literal["none", "repeat"] = "none"  # repeat rare defect types to balance them
    max_repeat: int = 8  # cap on the repeat factor of a rare defect type
    split_by: Literal["auto", "shard", "sample"] = "auto"  # how ranks share the data: whole shards (each
    # rank reads only its own; needs >= world_size shards) or every world_size-th sample (every rank reads
    # all shards); auto picks shard when that drops at most 10% of the samples to keep ranks equal
    max_image_pixels: int = 1 << 26  # decoded images larger than this are refused as decompression bombs

    def validate(self) -> None:
        require(self.resolution_px >= 8 and self.resolution_px % 8 == 0, "data.resolution_px",
                self.resolution_px, "use a multiple of 8 such as 512")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "use 1 or more")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 or more")
        require(self.max_repeat >= 1, "data.max_repeat", self.max_repeat, "use 1 or more")
        require(self.split in ("train", "val"), "data.split", self.split, "use train or val")
        require(self.max_image_pixels >= 64, "data.max_image_pixels", self.max_image_pixels,
                "use a pixel count such as 67108864")
        require(bool(self.train_shards), "data.train_shards", self.train_shards,
                "name a folder made by `defect-ds prepare`")


@dataclass
class LossConfig:
    defect_weight: float = 1.0  # loss weight of latent pixels inside the mask
    background_weight: float = 0.1  # loss weight of latent pixels outside the mask
    area_normalised: bool = True  # average defect and background areas separately, so a small
    # scratch weighs defect_weight however few pixels it covers; false: plain weighted pixel mean
    min_snr_gamma: float = 0.0  # min-SNR-gamma loss weighting; 0 turns it off
    noise_offset: float = 0.0  # offset noise strength; 0 turns it off
    prediction_type: Literal["scheduler", "epsilon", "v_prediction"] = "scheduler"  # target
    # Chance that a sample trains with an all-ones mask instead of its own (OneTrainer's "unmasked
    # probability"): then the adapters are open and the loss weighs the whole image as defect, so the
    # background is learned too now and then; 0 keeps every mask.
    unmasked_probability: float = 0.0
    # LoRA with mask gating only: weight of an extra background term whose target is the base model's
    # own prediction (adapters off, i.e. a zero mask; one more forward without gradients), so what
    # the adapters change leaks less into the background; 0 turns it off.
    prior_preservation_weight: float = 0.0

    def validate(self) -> None:
        require(self.defect_weight >= 0, "loss.defect_weight", self.defect_weight, "use 0 or more")
        require(self.background_weight >= 0, "loss.background_weight", self.background_weight,
                "use 0 or more")
        require(self.defect_weight + self.background_weight > 0, "loss.defect_weight",
                self.defect_weight, "make defect_weight or background_weight positive")
        require(self.min_snr_gamma >= 0, "loss.min_snr_gamma", self.min_snr_gamma, "use 0 (off) or 5")
        require(self.noise_offset >= 0, "loss.noise_offset", self.noise_offset, "use 0 (off) or 0.05")
        require(0.0 <= self.unmasked_probability <= 1.0, "loss.unmasked_probability",
                self.unmasked_probability, "use a probability in [0, 1] such as 0.1")
        require(self.prior_preservation_weight >= 0, "loss.prior_preservation_weight",
                self.prior_preservation_weight, "use 0 (off) or a weight such as 1.0")


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-4  # peak learning rate of the UNet parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 1e-2  # AdamW decoupled weight decay (not applied to new embeddings)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # gradient norm clip; 0 turns it off
    warmup_steps: int = 10  # linear warm-up optimizer steps
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up

    def validate(self) -> None:
        require(self.learning_rate > 0, "optimizer.learning_rate", self.learning_rate, "use e.g. 1e-4")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas",
                self.betas, "use two values in [0, 1) such as [0.9, 0.999]")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "use 0 or more")
        require(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "use 0 (off) or e.g. 1.0")
        require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "use 0 or more")


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    micro_batch_size: int = 4  # samples per rank per forward pass
    grad_accum_steps: int = 1  # micro batches per optimizer step
    seed: int = 0  # seeds data order, noise, timesteps and weights of new layers
    # auto: bf16 autocast on GPUs and on CPUs with native bf16 (avx512_bf16, AMX), else fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    ds_config: str = "ds_configs/zero2.json"  # DeepSpeed engine settings (ZeRO stage, offload)
    global_batch_size: int = 0  # if set, must equal micro batch x accumulation x world size
    stop_at_step: int = 0  # end this launch at this step (checkpointed) to fit a time limit; 0: off
    # a collective that waits longer than this fails the run (a rank that died, a node that hangs)
    collective_timeout_s: int = 1800

    def validate(self) -> None:
        require(self.max_steps >= 1, "train.max_steps", self.max_steps, "use 1 or more")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size,
                "use 1 or more")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps,
                "use 1 or more")
        require(self.stop_at_step >= 0, "train.stop_at_step", self.stop_at_step, "use 0 (off) or a step")
        require(self.collective_timeout_s >= 10, "train.collective_timeout_s", self.collective_timeout_s,
                "use 10 seconds or more, such as 1800")
        require(self.global_batch_size >= 0, "train.global_batch_size", self.global_batch_size,
                "use 0 (derived) or micro batch x accumulation x world size")


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # engine checkpoint and exports every N optimizer steps; 0: only at the end
    keep_last: int = 2  # engine checkpoints kept; older ones are deleted
    resume: str = ""  # "" starts fresh, "latest" continues the run directory's newest complete one
    # checkpoint at the end of the run (with every_steps=0 the only one); a launch cut short by
    # train.stop_at_step always saves, since it is meant to be resumed
    save_final: bool = True
    # a resume on other data than the checkpoint's (shards, split, augmentation) goes on, and is logged,
    # only when this is true; false stops it before anything is written
    allow_data_change: bool = False

    def validate(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use 0 or more")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "use 1 or more")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"  # where config, checkpoints, exports, logs and samples go
    log_every_steps: int = 10  # console, TensorBoard and MFU interval
    sample_every_steps: int = 100  # sample-image grid interval; 0 turns it off
    sample_prompts: list[str] = field(default_factory=list)  # default: one per defect token
    sample_steps: int = 20  # denoising steps of the sample grid
    tensorboard: bool = True  # write TensorBoard scalars under run_dir/tensorboard
    progress_bar: bool = True  # rich progress bar on rank 0
    peak_tflops: float = 0.0  # device peak for MFU; 0 looks the device up in the peak table
    profile_at_step: int = 0  # record a torch.profiler trace starting at this step (run_dir/profile); 0: off
    profile_steps: int = 3  # optimizer steps the profiler trace covers

    def validate(self) -> None:
        require(self.log_every_steps >= 1, "logging.log_every_steps", self.log_every_steps,
                "use 1 or more")
        require(self.sample_every_steps >= 0, "logging.sample_every_steps", self.sample_every_steps,
                "use 0 (off) or more")
        require(self.sample_steps >= 1, "logging.sample_steps", self.sample_steps, "use 1 or more")
        require(self.peak_tflops >= 0, "logging.peak_tflops", self.peak_tflops, "use 0 or more")
        require(self.profile_at_step >= 0, "logging.profile_at_step", self.profile_at_step,
                "use 0 (off) or the first step to profile")
        require(self.profile_steps >= 1, "logging.profile_steps", self.profile_steps, "use 1 or more")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.loss.prior_preservation_weight > 0:
            check_prior_preservation(self.model, self.lora)
        if self.model.unet_mode == "frozen" and not self.textual_inversion.enabled:
            raise ConfigError("Nothing trains: model.unet_mode is frozen and textual_inversion.enabled is "
                              "false; set one of them.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_prior_preservation(model: ModelConfig, lora: LoraConfig) -> None:
    """Prior preservation takes the base model's prediction as a zero-mask forward, which is the base
    model only when every adapter is gated."""
    if model.unet_mode != "lora" or not lora.mask_gating:
        raise ConfigError(f"loss.prior_preservation_weight needs mask-gated LoRA (model.unet_mode=lora, "
                          f"lora.mask_gating=true), not unet_mode={model.unet_mode} with mask_gating="
                          f"{str(lora.mask_gating).lower()}; set them or use prior_preservation_weight=0.")
    ungated = [t for t in lora.target_modules if t.endswith(TEXT_SIDE_TARGETS)]
    if ungated:
        raise ConfigError(f"loss.prior_preservation_weight needs every LoRA target gated by the mask, but "
                          f"lora.target_modules has {ungated[0]} (text side, never gated); drop it or use "
                          "prior_preservation_weight=0.")


def require(ok: bool, name: str, value: Any, fix: str) -> None:
    """The one-sentence error of a bad field: `name=value is invalid: fix.`"""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}.")


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check (and, for strings from the command line, parse) one value against a field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{name}={value!r} is not allowed: use one of {choices}.")
        return value
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected a list.")
        items = [_convert(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:
        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected a table.")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"union field types are not supported ({name})")
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected true or false.")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected an integer.")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected a number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected a string.")
        return value
    raise TypeError(f"unsupported field type {tp} ({name})")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"Unknown setting {name}; the {prefix} section knows: {known}.")
        setattr(section, key, _convert(value, hints[key], name))


Root = TypeVar("Root")  # a dataclass of sections (RunConfig, GenerateConfig, PretrainConfig), each a dataclass


def config_from_dict(data: dict[str, Any], base: Root | None = None) -> Root:
    """Sets nested {section: {field: value}} on `base` (default: a new RunConfig), typed field by field."""
    config = base if base is not None else RunConfig()
    sections = {f.name for f in dataclasses.fields(config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"Unknown config section [{section}]; known sections: "
                              f"{', '.join(sorted(sections))}.")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of settings, not {values!r}.")
        _apply(getattr(config, section), values, section)
    return config


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --section.field=value overrides, the other arguments) of a command line, so that argparse
    parses the rest; an override written --section.field VALUE takes the next argument along."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            take = 1 if "=" in arg else 2
            overrides += argv[i:i + take]
            i += take
        else:
            rest.append(arg)
            i += 1
    return overrides, rest


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """Turns ["--train.max_steps=10", "--lora.rank", "4"] into {"train": {"max_steps": "10"}, ...}."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"Cannot read the argument {arg!r}: write overrides as --section.field=value.")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"The override --{key} has no value: write --{key}=VALUE.")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
        i += 1
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass an existing .toml or .json file.")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"Config file {path} is not valid {path.suffix[1:].upper()}: {e}.") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, root: Root | None = None,
                layers: list[dict[str, Any]] | None = None) -> Root:
    """Defaults (`root`, else a RunConfig), then the file, then `layers` ({section: {field: value}}, such as
    a command's alias flags), then the --section.field=value overrides; validated."""
    config = root if root is not None else RunConfig()
    if path:
        config_from_dict(read_config_file(path), config)
    for layer in [*(layers or []), parse_overrides(overrides or [])]:
        config_from_dict(layer, config)
    config.validate()
    return config


# ---- the command line of a command with a config: --config FILE, alias flags, overrides ---------------

def add_config_argument(parser: argparse.ArgumentParser, sections: str) -> None:
    """--config FILE; the command then also takes --section.field=value overrides (see `defect_ds.cli`)."""
    parser.add_argument("--config", help=f"TOML or JSON file of settings ({sections}); a flag below sets the "
                        "field in [brackets], and --section.field=value sets any field (command line > file > "
                        "defaults)")
    parser.set_defaults(overrides=[])


def add_alias(parser: argparse._ActionsContainer, flag: str, field_name: str, **kwargs: Any) -> None:
    """A flag that sets one config field ("section.field"), its value typed by the loader like a file's;
    a flag not given leaves the field to the file or the default."""
    sets = f"{field_name}={str(kwargs['const']).lower()}" if "const" in kwargs else field_name
    kwargs["help"] = f"{kwargs['help']} [{sets}]" if kwargs.get("help") else f"[{sets}]"
    if kwargs.get("action", "store") == "store" and "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=field_name, default=argparse.SUPPRESS, **kwargs)


def alias_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The alias flags given on a command line (see `add_alias`) as {section: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, name = dest.partition(".")
        if dot:
            out.setdefault(section, {})[name] = value
    return out


def save_config(config: RunConfig, path: str | Path) -> None:
    from defect_ds.utils.files import atomic_write_json

    atomic_write_json(path, config.to_dict())
