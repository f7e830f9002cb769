"""What `defect-ds generate` makes: its config, its resolved settings, and every sample planned before
any denoising.

    python -c "from defect_ds.generate.spec import GenerateConfig; print(GenerateConfig())"
    python -c "from defect_ds.generate.spec import GenerationSettings; print(GenerationSettings())"

`GenerateConfig` is what a call asks for (a TOML file, the flags, `--section.field=value`, read by
`defect_ds.config.load_config`); `GenerationSettings` is what decides the samples, resolved against the
weights and recorded in generation.json. Planning is deterministic given the settings: each sample's key,
prompt, seed, mask and source are fixed first, so a run that stops can be started again and skips what it
finished.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields
from typing import Callable, Literal

import numpy as np

from defect_ds.config import ConfigError, require
from defect_ds.data.masks import KINDS, augment_mask, place_on_object, random_mask
from defect_ds.data.objects import centre_region, object_region
from defect_ds.data.reader import MaskPool
from defect_ds.data.sample import sanitise_key
from defect_ds.model.sampling import SCHEDULERS

MODES = ("text2img", "inpaint")
MASK_SOURCES = ("procedural", "files", "dataset", "augmented", "learned")
# draws one binary (R, R) mask of a defect type from a learned mask model, seeded by the generator
MaskSampler = Callable[[str, np.random.Generator], np.ndarray]
SEED_STRIDE = 100_000  # seed = settings.seed + SEED_STRIDE * (index of the defect type) + sample index
# The training captions' default (data/captions.py: "a photo of a {category} with {detail} {token}",
# detail "a" when none is given), so the tokens are prompted as they were learned.
DEFAULT_PROMPT = "a photo of a {category} with a {token}"
# mask sources that read a path, the field that names it, and what it is
MASK_INPUTS = {"dir": (("files",), "a folder of mask PNGs"),
               "data": (("dataset", "augmented"), "a data set whose defect masks to use"),
               "model": (("learned",), "a mask model folder made by `defect-ds train-masks`")}


# ---- the config: [weights], [samples], [masks], [sampling], [output] ---------------------------

@dataclass
class WeightsConfig:
    run: str = ""  # run directory or export folder (its export.json names the base model)
    base_model: str = ""  # diffusers SD folder; "": the one export.json names
    lora: str = ""  # without run: pytorch_lora_weights.safetensors (file or folder)
    # without run: learned_embeds/<token>.safetensors files or their folder; TYPE=FILE names the defect type,
    # else the export.json beside them does, else the token minus its sks_ prefix
    embeddings: list[str] = field(default_factory=list)
    mask_gating: bool = True  # false lets the LoRA act on the whole image
    mask_resize: Literal["", "nearest", "max"] = ""  # how the gate resizes masks; "": as trained, else nearest
    # TYPE=WORD items: prompt defect types by plain words instead of learned tokens; with base_model alone,
    # the base model without a fine-tune
    words: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.run and (self.lora or self.embeddings):
            raise ConfigError("Set either weights.run or weights.lora / weights.embeddings, not both.")
        for item in self.words:
            name, sep, word = item.partition("=")
            require(bool(sep and name.strip() and word.strip()), "weights.words", item,
                    "write TYPE=WORD items such as crack=crack")


@dataclass
class SamplesConfig:
    mode: Literal[MODES] = "text2img"  # text2img, or inpaint into the good images of `sources`
    defect_types: list[str] = field(default_factory=list)  # []: every learned token
    num_per_type: int = 8  # samples per defect type
    prompt: str = DEFAULT_PROMPT  # template with {token}, {defect_type}, {category}; default: the captions' form
    negative_prompt: str = ""
    category: str = "object"  # {category} and metadata where masks and sources bring none
    sources: str = ""  # inpaint: folder of good images, or a data set (its 'good' samples)
    skip_bad: bool = False  # skip truncated or corrupt source and mask files and count them

    def validate(self) -> None:
        require(self.num_per_type >= 1, "samples.num_per_type", self.num_per_type, "use 1 or more")
        if self.mode == "inpaint" and not self.sources:
            raise ConfigError("samples.mode=inpaint needs samples.sources (a folder of good images, or a data "
                              "set whose good samples to use).")
        if self.sources and self.mode != "inpaint":
            raise ConfigError("samples.sources is only read with samples.mode=inpaint; set that mode or leave "
                              "samples.sources empty.")


@dataclass
class MasksConfig:
    # procedural, or read from a path: files (dir), dataset or augmented (data), learned (model)
    source: Literal[MASK_SOURCES] = "procedural"
    dir: str = ""  # files: folder of mask PNGs (a subfolder per defect type)
    data: str = ""  # dataset, augmented: the few shots (shards folder) whose masks to reuse or augment
    model: str = ""  # learned: a mask model folder (`defect-ds train-masks`)
    kind: Literal[KINDS] = "mixed"  # procedural: shape
    size: tuple[float, float] = (0.15, 0.4)  # procedural: extent (min, max) as a fraction of the object's size

    def validate(self) -> None:
        require(len(self.size) == 2 and 0 < self.size[0] <= self.size[-1] <= 1, "masks.size", self.size,
                "use two fractions 0 < min <= max <= 1")
        for name, (sources, what) in MASK_INPUTS.items():
            given = getattr(self, name)
            if self.source in sources and not given:
                raise ConfigError(f"masks.source={self.source} needs masks.{name} ({what}); set it or use "
                                  "masks.source=procedural.")
            if given and self.source not in sources:  # else the path would be silently ignored
                raise ConfigError(f"masks.{name} is only read with masks.source={' or '.join(sources)}; set "
                                  f"masks.source={sources[0]} or leave masks.{name} empty.")


@dataclass
class SamplingConfig:
    scheduler: Literal[SCHEDULERS] = "ddim"  # ddim, dpm++ (DPM-Solver++ multistep) or euler
    steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance scale
    # inpaint: free every latent cell the mask touches (cells), or let diffusers shrink the mask by nearest sampling
    inpaint_mask: Literal["cells", "nearest"] = "cells"
    strength: float = 1.0  # inpaint: noise level of the mask region, in (0, 1]
    seed: int = 0  # base seed (see SEED_STRIDE)
    resolution_px: int = 0  # square output size; 0: the export's resolution
    batch_size: int = 4  # samples per denoising call
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    # auto: bf16 on a GPU and on a CPU with native bf16 (avx512_bf16, AMX), else fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def validate(self) -> None:
        require(self.steps >= 1, "sampling.steps", self.steps, "use 1 or more")
        require(self.batch_size >= 1, "sampling.batch_size", self.batch_size, "use 1 or more")
        require(0 < self.strength <= 1, "sampling.strength", self.strength, "use a value in (0, 1]")
        require(self.resolution_px >= 0 and self.resolution_px % 8 == 0, "sampling.resolution_px",
                self.resolution_px, "use 0 (the export's) or a multiple of 8")


@dataclass
class OutputConfig:
    shard_size: int = 1000  # samples per WebDataset shard
    layout: Literal["shards", "mvtec"] = "shards"  # mvtec: also write OUT_DIR/mvtec/, the MVTec AD tree
    progress: bool = True  # a progress bar

    def validate(self) -> None:
        require(self.shard_size >= 1, "output.shard_size", self.shard_size, "use 1 or more")


@dataclass
class QualityConfig:
    """The optional filter of `generate/filter.py`: a segmenter trained on the shots judges each pair."""
    keep_recognisable: bool = False  # shards/ keeps only the pairs whose defect the judge finds inside the mask
    judge_data: str = ""  # the shots the judge trains on; "": masks.data
    judge_steps: int = 900  # the judge's training steps (the downstream segmenter's default)
    threshold: float = 0.5  # found: the judge's highest probability inside the mask reaches this

    def validate(self) -> None:
        require(self.judge_steps >= 1, "quality.judge_steps", self.judge_steps, "use 1 or more")
        require(0 < self.threshold < 1, "quality.threshold", self.threshold, "use a value in (0, 1)")


@dataclass
class GenerateConfig:
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate()
        require(not self.quality.keep_recognisable or bool(self.quality.judge_data or self.masks.data),
                "quality.judge_data", self.quality.judge_data,
                "--keep-recognisable needs the shots its judge trains on: pass --judge-data or --data")


# ---- the resolved settings and the samples ---------------------------------------------------


@dataclass
class GenerationSettings:
    """Everything that decides what a sample looks like; a resumed run must match it."""
    mode: str = "text2img"  # text2img or inpaint
    scheduler: str = "ddim"  # ddim, dpm++ (DPM-Solver++ multistep) or euler
    steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance scale
    strength: float = 1.0  # inpaint only: how much noise the masked region starts from (1 = all)
    resolution_px: int = 64  # square output size
    prompt: str = DEFAULT_PROMPT  # template: {token}, {defect_type}, {category}
    negative_prompt: str = ""
    category: str = "object"  # {category} where masks and sources bring none
    seed: int = 0  # base seed
    mask_source: str = "procedural"  # procedural, files, dataset, augmented or learned
    mask_kind: str = "mixed"  # procedural masks: stroke, blob or mixed
    mask_size: tuple[float, float] = (0.15, 0.4)  # procedural masks: extent / object side
    mask_data: str = ""  # dataset and augmented masks: the data set they come from
    mask_model: str = ""  # learned masks: the mask model folder (`defect-ds train-masks`)
    precision: str = "fp32"  # fp32 or bf16 (resolved)
    export: str = ""  # export folder the weights came from ("" when given as files)
    export_step: int | None = None  # the training step of that export (a retrained run differs)
    base_model: str = ""
    lora: str = ""  # loose LoRA file ("" with an export)
    embeddings: list[str] = field(default_factory=list)  # loose embeddings as "type=file"
    mask_gating: bool = False  # whether the mask gates the LoRA
    mask_resize: str = ""  # how the gate resizes masks (nearest or max; "" without gating)
    inpaint_mask: str = "cells"  # inpaint: every latent cell the mask touches (cells) or diffusers' nearest


@dataclass
class SampleSpec:
    """One sample to generate: all its inputs are fixed before any denoising starts."""
    key: str
    defect_type: str
    token: str
    prompt: str
    seed: int
    category: str
    mask: np.ndarray  # (R, R) uint8 0/1
    mask_origin: str
    source: np.ndarray | None = None  # (R, R, 3) uint8, inpaint mode
    source_origin: str = ""
    extra: dict = field(default_factory=dict)


# ---- planning: prompts, seeds, masks, sources ------------------------------------------------

def plan_samples(tokens: dict[str, str], defect_types: list[str], num_per_type: int,
                 settings: GenerationSettings, *, mask_pool: MaskPool, sources: list[tuple[np.ndarray, str, str]],
                 loose_weights: bool = False, mask_sampler: MaskSampler | None = None) -> list[SampleSpec]:
    """Every sample's key, prompt, seed, mask and source; deterministic given the flags.

    mask_pool: {defect_type or "*": [(mask, origin, category)]} for file and data-set masks.
    sources: [(image, origin, category)] good images for inpainting. An inpainted sample takes its
    masks from those of its source's category when the pool has any (a pill's crack on a pill).
    augmented: a pool mask, rotated, scaled, flipped and deformed, placed on the object (the source's, else
    the image minus a margin); learned: `mask_sampler`'s mask, placed the same way. Both record what they
    drew in the sample's json (`mask_augmentation`, `mask_placement`).
    """
    all_types = sorted(tokens)
    r = settings.resolution_px
    specs = []
    for defect_type in defect_types:
        type_index = all_types.index(defect_type)
        pool = mask_pool.get(defect_type) or mask_pool.get("*") or []
        if settings.mask_source in ("augmented",) and not pool:
            raise ValueError(f"Augmented masks need a non-empty mask of defect type {defect_type!r} in the mask "
                             f"pool, and there is none (types with masks: {', '.join(sorted(mask_pool)) or 'none'}); "
                             "add a shot of that type with its mask or leave the type out of the defect types.")
        if settings.mask_source in ("files", "dataset") and not pool:
            fix = ("name the embeddings TYPE=FILE to match" if loose_weights else
                   "keep to the defect types that have masks")
            raise ValueError(f"There are no masks of defect type {defect_type!r} (found: "
                             f"{', '.join(sorted(mask_pool))}); {fix}, or put masks in a folder named after "
                             "the type.")
        for i in range(num_per_type):
            seed = settings.seed + SEED_STRIDE * type_index + i
            rng = np.random.default_rng([seed, zlib.crc32(defect_type.encode())])
            source, source_origin, category = None, "", settings.category
            if settings.mode == "inpaint":
                source, source_origin, category = sources[(i * len(all_types) + type_index) % len(sources)]
                category = category or settings.category
            extra: dict = {}
            if settings.mask_source == "procedural":
                region = object_region(source) if source is not None else None
                mask = random_mask(r, r, rng, region, settings.mask_kind, tuple(settings.mask_size))
                mask_origin = f"procedural:{settings.mask_kind}"
            elif settings.mask_source == "learned":
                if mask_sampler is None:
                    raise ValueError("Learned masks need a mask_sampler (see `generate.mask_model`).")
                region = object_region(source) if source is not None else centre_region(r, r)
                mask, placed = place_on_object(_defect_box(mask_sampler(defect_type, rng)), region, rng)
                mask_origin = f"learned:{settings.mask_model}"
                extra = {"mask_placement": placed}
            elif settings.mask_source == "augmented":
                same = [m for m in pool if source is not None and m[2] and m[2] == category]
                real, real_origin, mask_category = (same or pool)[i % len(same or pool)]
                if source is None:
                    category = mask_category or category
                region = object_region(source) if source is not None else centre_region(r, r)
                shape, drawn = augment_mask(real, rng)
                mask, placed = place_on_object(shape, region, rng)
                mask_origin = f"augmented:{real_origin}"
                extra = {"mask_augmentation": drawn, "mask_placement": placed}
            else:
                same = [m for m in pool if source is not None and m[2] and m[2] == category]
                mask, mask_origin, mask_category = (same or pool)[i % len(same or pool)]
                if source is None:
                    category = mask_category or category
            token = tokens[defect_type]
            prompt = settings.prompt.format(token=token, defect_type=defect_type.replace("_", " "),
                                            category=category.replace("_", " "))  # as captions spell them
            specs.append(SampleSpec(key=f"{sanitise_key(defect_type)}-{i:06d}", defect_type=defect_type, token=token,
                                    prompt=prompt, seed=seed, category=category, mask=mask,
                                    mask_origin=mask_origin, source=source, source_origin=source_origin,
                                    extra=extra))
    return specs


def _defect_box(mask: np.ndarray) -> np.ndarray:
    """A sampled mask cropped to its defect, to be placed on the object; an empty sample is refused."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise ValueError("The mask model drew an empty mask; train it longer or on more shots.")
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8)
