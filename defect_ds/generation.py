"""`defect-ds generate`: new defect images with exact masks, from a trained run or its exports.

    defect-ds generate work/gen --run runs/default --num-per-type 8
    defect-ds generate work/inpaint --run runs/default --mode inpaint --sources work/data --masks procedural

Two modes. text2img: the prompt with the defect's learned token and a mask draw a whole new image;
the mask gates the LoRA, so the fine-tuned defect appears there. inpaint: a defect is painted into
a given good image; the latents outside the mask are held to the source's while denoising, and the
decoded result is composited in pixel space (`mask * generated + (1 - mask) * source`), so every
pixel outside the mask is the source's, bit for bit, and the mask is an exact label.

This module holds the settings, the pipeline, the planning of samples and the command; reading
inputs is in `sample_io.py`, writing samples, shards and the resume check in `generation_output.py`.
A run that stops can be started again with the same flags: finished samples are skipped and each
sample's seed depends only on its key.
"""
from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defect_ds.generation_output import SETTINGS_FILE, check_resume, sample_done, write_sample, write_shards
from defect_ds.procedural_masks import KINDS, object_region, random_mask
from defect_ds.sample_io import (IMAGE_EXTS, MaskPool, fit_square, iter_dataset, load_mask, load_mask_pool,
                                 load_rgb, load_sources, mask_localisation, safe_key)

# Re-exported: older callers import these from here.
__all__ = ["GenerationSettings", "SampleSpec", "build_pipeline", "plan_samples", "generate_batch", "composite",
           "SETTINGS_FILE", "IMAGE_EXTS", "check_resume", "sample_done", "write_sample", "write_shards",
           "fit_square", "iter_dataset", "load_mask", "load_mask_pool", "load_rgb", "load_sources",
           "mask_localisation", "safe_key"]

SCHEDULERS = ("ddim", "dpm++", "euler")
MODES = ("text2img", "inpaint")
MASK_SOURCES = ("procedural", "files", "dataset")
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
    mask_source: str = "procedural"  # procedural, files or dataset
    mask_kind: str = "mixed"  # procedural masks: stroke, blob or mixed
    mask_size: tuple[float, float] = (0.15, 0.4)  # procedural masks: extent / object side
    precision: str = "fp32"  # fp32 or bf16 (resolved)
    export: str = ""  # export folder the weights came from ("" when given as files)
    export_step: int | None = None  # the training step of that export (a retrained run differs)
    base_model: str = ""
    lora: str = ""  # loose LoRA file ("" with an export)
    embeddings: list[str] = field(default_factory=list)  # loose embeddings as "type=file"
    mask_gating: bool = False  # whether the mask gates the LoRA
    mask_resize: str = ""  # how the gate resizes masks (nearest or max; "" without gating)


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


# ---- the pipeline ----------------------------------------------------------------------------

def resolve_device(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return torch.device(device), {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def set_scheduler(pipe, name: str) -> None:
    """Replaces the pipeline's scheduler, keeping the model's noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = pipe.scheduler.config
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    elif name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                 solver_order=2)
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    else:
        raise ValueError(f"Unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}.")


def build_pipeline(*, run: str | None = None, base_model: str | None = None, lora: str | None = None,
                   embeddings: list[str] | None = None, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32, mask_gating: bool = True,
                   mask_resize: str | None = None):
    """A StableDiffusionPipeline with the trained LoRA (or UNet), learned tokens and mask gating loaded.

    Either `run` (a run directory or an export folder; the base model defaults to the one the
    export names) or `base_model` with `lora` (a .safetensors file or its folder) and/or
    `embeddings` (see `resolve_embeddings`). Returns (pipe, {defect_type: token}, info) where info
    records where the weights came from and how the mask gates them.
    mask_resize: how the gate resizes masks (None: as the export was trained, else nearest).
    """
    from diffusers import StableDiffusionPipeline

    from defect_ds.export import find_export, load_export, read_export_meta
    from defect_ds.masking import enable_mask_gating
    from defect_ds.models import check_model_dir

    meta: dict = {}
    export_dir = None
    if run:
        export_dir = find_export(run)
        meta = read_export_meta(export_dir)
        base_model = base_model or meta.get("base_model")
    elif not (lora or embeddings):
        raise ValueError("Nothing to generate with: pass --run RUN_DIR, or --base-model with --lora "
                         "and/or --embeddings.")
    if not base_model:
        raise ValueError("No base model: the export names none, so pass --base-model DIR.")
    check_model_dir(base_model)
    loose = resolve_embeddings(embeddings or [])  # checked before the (slow) model load
    pipe = StableDiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    lora_file = ""
    if export_dir is not None:
        load_export(pipe, export_dir, mask_gating=mask_gating, mask_resize=mask_resize)
        tokens = dict(meta.get("tokens", {}))
    else:
        tokens = {t: token for t, (token, _) in loose.items()}
        if lora:
            lora_path = Path(lora)
            if not lora_path.exists():
                raise FileNotFoundError(f"--lora {lora} does not exist; pass pytorch_lora_weights.safetensors "
                                        "or the folder holding it.")
            if lora_path.is_file():
                pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
            else:
                pipe.load_lora_weights(str(lora_path))
            lora_file = str(lora_path.resolve())
            if mask_gating:
                enable_mask_gating(pipe.unet, mask_resize or "nearest")
        if loose:
            pipe.load_textual_inversion(sorted({str(f) for _, f in loose.values()}))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    gate = getattr(pipe.unet, "mask_gate", None)
    info = {"export": str(export_dir) if export_dir else "", "export_step": meta.get("step"),
            "base_model": str(Path(base_model).resolve()), "resolution_px": meta.get("resolution_px"),
            "lora": lora_file, "embeddings": [f"{t}={f.resolve()}" for t, (_, f) in sorted(loose.items())],
            "mask_gating": gate is not None, "mask_resize": gate.resize if gate is not None else ""}
    return pipe, tokens, info


def resolve_embeddings(items: list[str]) -> dict[str, tuple[str, Path]]:
    """{defect_type: (token, file)} from --embeddings items: TYPE=FILE, FILE or FOLDER of files.

    Without TYPE=, the defect type comes from the export.json beside the file's folder or above it
    (its tokens map, defect type -> token), else from the token with the project's token prefix
    (`sks_crack` -> `crack`, as data/captions.py names tokens); a token that is neither must be named.
    """
    from defect_ds.data.captions import DEFAULT_TOKEN_PREFIX

    out: dict[str, tuple[str, Path]] = {}
    for item in items:
        named, sep, rest = item.partition("=")
        typed = bool(sep) and named and "/" not in named
        defect_type, path = (named, Path(rest)) if typed else ("", Path(item))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"--embeddings {item}: no such .safetensors file or folder of them.")
        if defect_type and len(files) > 1:
            raise ValueError(f"--embeddings {item}: TYPE= names one file, but {path} holds {len(files)}; "
                             "give one TYPE=FILE per defect type.")
        for f in files:
            token = _token_of(f)
            found = defect_type or _type_from_export(f, token)
            if not found and token.startswith(DEFAULT_TOKEN_PREFIX) and len(token) > len(DEFAULT_TOKEN_PREFIX):
                found = token[len(DEFAULT_TOKEN_PREFIX):]
            if not found:
                raise ValueError(f"--embeddings {item}: the defect type of token {token!r} is unknown (no "
                                 f"export.json beside it, no {DEFAULT_TOKEN_PREFIX!r} prefix); write "
                                 f"--embeddings TYPE={f}.")
            if found in out and out[found][1] != f:
                raise ValueError(f"--embeddings gives defect type {found!r} twice ({out[found][1]} and {f}); "
                                 "give each type one file.")
            out[found] = (token, f)
    return out


def _type_from_export(file: Path, token: str) -> str:
    """The defect type whose token is `token` in an export.json next to or above the file's folder."""
    from defect_ds.export import META_FILE

    for folder in (file.parent, file.parent.parent):
        if (folder / META_FILE).is_file():
            tokens = json.loads((folder / META_FILE).read_text()).get("tokens", {})
            return next((t for t, tok in tokens.items() if tok == token), "")
    return ""


def _token_of(path: Path) -> str:
    """The token a diffusers textual-inversion file defines: its single key (else its file name)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return path.stem
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return keys[0] if len(keys) == 1 else path.stem


@torch.no_grad()
def generate_batch(pipe, specs: list[SampleSpec], settings: GenerationSettings, inpaint_pipe=None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Denoises one batch; returns (image, raw) uint8 (R, R, 3) pairs per sample.

    raw is the decoded image; image is the same composited onto the source when inpainting.
    """
    from defect_ds.masking import mask_context

    device = pipe.device
    r = settings.resolution_px
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]  # same noise on any device
    masks = torch.from_numpy(np.stack([s.mask for s in specs])).float()[:, None]  # (B, 1, R, R)
    gated = getattr(pipe.unet, "mask_gate", None) is not None
    kwargs = dict(prompt=[s.prompt for s in specs], negative_prompt=[settings.negative_prompt] * len(specs),
                  height=r, width=r, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                  generator=generators, output_type="np")
    with mask_context(pipe.unet, masks.to(device, pipe.unet.dtype)) if gated else _nothing():
        if settings.mode == "text2img":
            out = pipe(**kwargs).images
        else:
            sources = [Image.fromarray(s.source) for s in specs]
            mask_images = [Image.fromarray(s.mask * 255) for s in specs]
            out = inpaint_pipe(image=sources, mask_image=mask_images, strength=settings.strength, **kwargs).images
    raws = [(np.clip(np.asarray(o, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8) for o in out]
    if settings.mode == "text2img":
        return [(raw, raw) for raw in raws]
    return [(composite(raw, s.source, s.mask), raw) for raw, s in zip(raws, specs)]


def composite(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """mask * generated + (1 - mask) * source on uint8 pixels: outside the mask exactly the source."""
    return np.where(mask[..., None].astype(bool), generated, source)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- planning: prompts, seeds, masks, sources ------------------------------------------------

def plan_samples(tokens: dict[str, str], defect_types: list[str], num_per_type: int,
                 settings: GenerationSettings, *, mask_pool: MaskPool, sources: list[tuple[np.ndarray, str, str]],
                 loose_weights: bool = False) -> list[SampleSpec]:
    """Every sample's key, prompt, seed, mask and source; deterministic given the flags.

    mask_pool: {defect_type or "*": [(mask, origin, category)]} for file and data-set masks.
    sources: [(image, origin, category)] good images for inpainting. An inpainted sample takes its
    masks from those of its source's category when the pool has any (a pill's crack on a pill).
    """
    all_types = sorted(tokens)
    r = settings.resolution_px
    specs = []
    for defect_type in defect_types:
        type_index = all_types.index(defect_type)
        pool = mask_pool.get(defect_type) or mask_pool.get("*") or []
        if settings.mask_source != "procedural" and not pool:
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
            if settings.mask_source == "procedural":
                region = object_region(source) if source is not None else None
                mask = random_mask(r, r, rng, region, settings.mask_kind, tuple(settings.mask_size))
                mask_origin = f"procedural:{settings.mask_kind}"
            else:
                same = [m for m in pool if source is not None and m[2] and m[2] == category]
                mask, mask_origin, mask_category = (same or pool)[i % len(same or pool)]
                if source is None:
                    category = mask_category or category
            token = tokens[defect_type]
            prompt = settings.prompt.format(token=token, defect_type=defect_type.replace("_", " "),
                                            category=category.replace("_", " "))  # as captions spell them
            specs.append(SampleSpec(key=f"{safe_key(defect_type)}-{i:06d}", defect_type=defect_type, token=token,
                                    prompt=prompt, seed=seed, category=category, mask=mask,
                                    mask_origin=mask_origin, source=source, source_origin=source_origin))
    return specs


# ---- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from defect_ds.report import save_sample_grid

    device, dtype = resolve_device(args.device, args.precision)
    pipe, tokens, info = build_pipeline(run=args.run, base_model=args.base_model, lora=args.lora,
                                        embeddings=args.embeddings, device=device, dtype=dtype,
                                        mask_gating=not args.no_mask_gating, mask_resize=args.mask_resize)
    if not tokens:
        raise ValueError("The export has no learned tokens; pass --embeddings or train with textual inversion.")
    defect_types = args.defect_types.split(",") if args.defect_types else sorted(tokens)
    unknown = [t for t in defect_types if t not in tokens]
    if unknown:
        raise ValueError(f"--defect-types names {unknown[0]!r}, which the export has no token for; "
                         f"known: {', '.join(sorted(tokens))}.")
    resolution = args.resolution_px or info["resolution_px"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = GenerationSettings(
        mode=args.mode, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
        strength=args.strength, resolution_px=int(resolution), prompt=args.prompt,
        negative_prompt=args.negative_prompt, category=args.category, seed=args.seed, mask_source=args.masks,
        mask_kind=args.mask_kind, mask_size=tuple(args.mask_size),
        precision="bf16" if dtype == torch.bfloat16 else "fp32", export=info["export"],
        export_step=info["export_step"], base_model=info["base_model"], lora=info["lora"],
        embeddings=info["embeddings"], mask_gating=info["mask_gating"], mask_resize=info["mask_resize"])
    # every input is read and every sample planned before the folder is touched: a call that fails
    # here leaves nothing behind that a corrected call would have to match
    pool = load_mask_pool(settings.mask_source, args.mask_dir or args.data, settings.resolution_px)
    sources = load_sources(args.sources, settings.resolution_px) if settings.mode == "inpaint" else []
    specs = plan_samples(tokens, defect_types, args.num_per_type, settings, mask_pool=pool, sources=sources,
                         loose_weights=not args.run)
    out_dir = Path(args.out_dir)
    check_resume(out_dir, settings)
    set_scheduler(pipe, settings.scheduler)
    inpaint_pipe = None
    if settings.mode == "inpaint":
        from diffusers import StableDiffusionInpaintPipeline

        inpaint_pipe = StableDiffusionInpaintPipeline(**pipe.components)  # same modules, LoRA and tokens
        inpaint_pipe.set_progress_bar_config(disable=True)
    todo = [s for s in specs if not sample_done(out_dir, s.key)]
    print(f"generate: {len(specs)} samples planned, {len(specs) - len(todo)} already written, "
          f"{len(todo)} to go ({settings.mode}, {settings.scheduler}, {settings.steps} steps, {device}, "
          f"{settings.precision})")
    with Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=args.no_progress) as progress:
        task = progress.add_task("generate", total=len(todo))
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            for spec, (image, raw) in zip(batch, generate_batch(pipe, batch, settings, inpaint_pipe)):
                write_sample(out_dir, spec, image, settings, raw if spec.source is not None else None)
            progress.advance(task, len(batch))
    shards = write_shards(out_dir, tokens, args.shard_size, extra={"generation": asdict(settings)})
    grid = save_sample_grid(out_dir / "samples", out_dir / "grid.png")
    print(f"wrote {len(specs)} samples to {out_dir / 'samples'}, {len(shards)} shard(s) to {out_dir / 'shards'}, "
          f"grid {grid}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate defect images with exact masks from a trained export",
                       description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="output folder (samples/, shards/, grid.png); resumed if it exists")
    src = p.add_argument_group("weights")
    src.add_argument("--run", help="run directory or export folder (export.json names the base model)")
    src.add_argument("--base-model", help="diffusers SD folder (default: the one export.json names)")
    src.add_argument("--lora", help="without --run: pytorch_lora_weights.safetensors (file or folder)")
    src.add_argument("--embeddings", nargs="+", help="without --run: learned_embeds/<token>.safetensors "
                     "files or their folder; TYPE=FILE names the defect type, else the export.json beside "
                     "them does, else the token minus its sks_ prefix")
    src.add_argument("--no-mask-gating", action="store_true", help="let the LoRA act on the whole image")
    src.add_argument("--mask-resize", choices=("nearest", "max"),
                     help="how the gate resizes masks to each layer (default: as trained, else nearest)")
    what = p.add_argument_group("what to generate")
    what.add_argument("--mode", choices=MODES, default="text2img")
    what.add_argument("--defect-types", help="comma-separated defect types (default: every learned token)")
    what.add_argument("--num-per-type", type=int, default=8, help="samples per defect type")
    what.add_argument("--prompt", default=DEFAULT_PROMPT,
                      help="prompt template with {token}, {defect_type}, {category} (default: the training "
                           "captions' form)")
    what.add_argument("--negative-prompt", default="")
    what.add_argument("--category", default="object", help="object category for {category} and metadata "
                      "(data-set masks and sources bring their own)")
    what.add_argument("--sources", help="inpaint: folder of good images, or a data set (its 'good' samples)")
    masks = p.add_argument_group("masks")
    masks.add_argument("--masks", choices=MASK_SOURCES, default="procedural")
    masks.add_argument("--mask-dir", help="--masks files: folder of mask PNGs (subfolders per defect type)")
    masks.add_argument("--data", help="--masks dataset: shards folder whose masks to reuse, per defect type")
    masks.add_argument("--mask-kind", choices=KINDS, default="mixed", help="procedural masks: shape")
    masks.add_argument("--mask-size", type=float, nargs=2, default=[0.15, 0.4], metavar=("MIN", "MAX"),
                       help="procedural masks: extent as a fraction of the object's size")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    sampling.add_argument("--steps", type=int, default=30)
    sampling.add_argument("--guidance-scale", type=float, default=7.5)
    sampling.add_argument("--strength", type=float, default=1.0, help="inpaint: noise level of the mask region")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--resolution-px", type=int, default=0, help="default: the export's resolution")
    sampling.add_argument("--batch-size", type=int, default=4)
    sampling.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    sampling.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                          help="auto: bf16 on a GPU, fp32 on the CPU")
    out = p.add_argument_group("output")
    out.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_checked_run)


def _checked_run(args: argparse.Namespace) -> int:
    """Flag checks that need no model: a bad call stops here, in a second, before anything is written."""
    for name in ("num_per_type", "steps", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: use 1 or more.")
    if not 0 < args.strength <= 1:
        raise ValueError(f"--strength={args.strength} is invalid: use a value in (0, 1].")
    if args.resolution_px and args.resolution_px % 8:
        raise ValueError(f"--resolution-px={args.resolution_px} is invalid: use a multiple of 8.")
    lo, hi = args.mask_size
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"--mask-size {lo} {hi} is invalid: use 0 < MIN <= MAX <= 1.")
    if args.run and (args.lora or args.embeddings):
        raise ValueError("Pass either --run or --lora/--embeddings, not both.")
    needs = {"files": ("mask_dir", "--mask-dir DIR (a folder of mask PNGs)"),
             "dataset": ("data", "--data DIR (a data set whose defect masks to reuse)")}
    for kind, (attr, flag) in needs.items():
        given = getattr(args, attr)
        if args.masks == kind and not given:
            raise ValueError(f"--masks {kind} needs {flag}; add it or use --masks procedural.")
        if given and args.masks != kind:  # else the folder would be silently ignored
            raise ValueError(f"--{attr.replace('_', '-')} is only read with --masks {kind}; add --masks {kind} "
                             "or drop the flag.")
    if args.mode == "inpaint" and not args.sources:
        raise ValueError("--mode inpaint needs --sources DIR (good images, or a data set's good samples).")
    if args.sources and args.mode != "inpaint":
        raise ValueError("--sources is only read with --mode inpaint; add --mode inpaint or drop --sources.")
    return run(args)
