"""What `defect-ds generate` makes: its settings, and every sample planned before any denoising.

    python -c "from defect_ds.generate.spec import GenerationSettings; print(GenerationSettings())"

Planning is deterministic given the flags: each sample's key, prompt, seed, mask and source are
fixed first, so a run that stops can be started again and skips what it finished.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from defect_ds.data.masks import augment_mask, place_on_object, random_mask
from defect_ds.data.objects import centre_region, object_region
from defect_ds.data.reader import MaskPool
from defect_ds.data.sample import sanitise_key

MODES = ("text2img", "inpaint")
MASK_SOURCES = ("procedural", "files", "dataset", "augmented", "learned")
# draws one binary (R, R) mask of a defect type from a learned mask model, seeded by the generator
MaskSampler = Callable[[str, np.random.Generator], np.ndarray]
SEED_STRIDE = 100_000  # seed = --seed + SEED_STRIDE * (index of the defect type) + sample index
# The training captions' default (data/captions.py: "a photo of a {category} with {detail} {token}",
# detail "a" when none is given), so the tokens are prompted as they were learned.
DEFAULT_PROMPT = "a photo of a {category} with a {token}"


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
            raise ValueError(f"--masks augmented needs a non-empty mask of defect type {defect_type!r} among "
                             f"the shots in --data, and there is none (types with masks: "
                             f"{', '.join(sorted(mask_pool)) or 'none'}); add a shot of that type with its mask "
                             "or leave the type out of --defect-types.")
        if settings.mask_source in ("files", "dataset") and not pool:
            fix = ("name the embeddings TYPE=FILE to match" if loose_weights else
                   "pass --defect-types with only the types that have masks")
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
                    raise ValueError("--masks learned needs --mask-model DIR (made by `defect-ds train-masks`).")
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
