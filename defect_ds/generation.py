"""`defect-ds generate`: new defect images with exact masks, from a trained run or its exports.

    defect-ds generate out/gen --run runs/default --num-per-type 8
    defect-ds generate out/inpaint --run runs/default --mode inpaint --sources work/data/good --masks procedural

Two modes. text2img: the prompt with the defect's learned token and a mask draw a whole new image;
the mask gates the LoRA, so the fine-tuned defect appears there. inpaint: a defect is painted into
a given good image; the latents outside the mask are held to the source's while denoising, and the
decoded result is composited in pixel space (`mask * generated + (1 - mask) * source`), so every
pixel outside the mask is the source's, bit for bit, and the mask is an exact label.

Each sample is written as a folder samples/<key>/ (image.png, mask.png, caption.txt, json, and
source.png for inpainting) and, at the end, all samples as WebDataset shards in the training format
(shards/train-NNNNNN.tar + manifest.json). A run that stops can be started again with the same
flags: finished samples are skipped and each sample's seed depends only on its key.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from defect_ds.procedural_masks import KINDS, object_region, random_mask

SCHEDULERS = ("ddim", "dpm++", "euler")
MODES = ("text2img", "inpaint")
MASK_SOURCES = ("procedural", "files", "dataset")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
SETTINGS_FILE = "generation.json"
SEED_STRIDE = 100_000  # seed = --seed + SEED_STRIDE * (index of the defect type) + sample index


@dataclass
class GenerationSettings:
    """Everything that decides what a sample looks like; a resumed run must match it."""
    mode: str = "text2img"  # text2img or inpaint
    scheduler: str = "ddim"  # ddim, dpm++ (DPM-Solver++ multistep) or euler
    steps: int = 30  # denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance scale
    strength: float = 1.0  # inpaint only: how much noise the masked region starts from (1 = all)
    resolution_px: int = 64  # square output size
    prompt: str = "a photo with {token}"  # template: {token}, {defect_type}, {category}
    negative_prompt: str = ""
    seed: int = 0  # base seed
    mask_source: str = "procedural"  # procedural, files or dataset
    mask_kind: str = "mixed"  # procedural masks: stroke, blob or mixed
    mask_size: tuple[float, float] = (0.15, 0.4)  # procedural masks: extent / object side
    precision: str = "fp32"  # fp32 or bf16 (resolved)
    export: str = ""  # export folder the weights came from ("" when given as files)
    base_model: str = ""


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


# ---- images and data sets --------------------------------------------------------------------

def fit_square(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize the short side to `size`, then centre-crop to size x size."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_rgb(data: bytes | str | Path, size: int | None = None) -> np.ndarray:
    import io

    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
    if size is not None and image.size != (size, size):
        image = fit_square(image, size)
    return np.asarray(image, dtype=np.uint8).copy()


def load_mask(data: bytes | str | Path, size: int | None = None) -> np.ndarray:
    """A uint8 0/1 (H, W) mask from a PNG (values above 127 are defect)."""
    import io

    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("L")
    if size is not None and image.size != (size, size):
        image = fit_square(image, size, Image.NEAREST)
    return (np.asarray(image) > 127).astype(np.uint8)


def shard_files(folder: Path, splits: tuple[str, ...] | None = None) -> list[Path]:
    files = sorted(folder.glob("*.tar"))
    if splits is not None:
        files = [f for f in files if f.name.split("-")[0] in splits]
    return files


def iter_dataset(path: str | Path, splits: tuple[str, ...] | None = None) -> Iterator[dict]:
    """Samples of a data set: WebDataset shards, a generated samples/ folder, or a folder of images.

    Yields {"key", "image" (bytes), "mask" (bytes or None), "meta" (dict), "source" (bytes or None),
    "kind" ("shards", "folder" or "images")}.
    Plain image folders: the defect type is the image's parent folder name ("all" at the top).
    """
    import webdataset as wds

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a shards folder, a generated folder or "
                                "a folder of images.")
    if (path / "samples").is_dir():
        path = path / "samples"
    shards = shard_files(path, splits) if path.is_dir() else [path]
    if shards and shards[0].suffix == ".tar":
        for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"]) if "json" in sample else {}
            yield {"key": sample["__key__"], "image": sample["image.png"], "mask": sample.get("mask.png"),
                   "meta": meta, "source": sample.get("source.png"), "kind": "shards"}
        return
    for folder in sorted(p.parent for p in path.glob("*/json")):
        meta = json.loads((folder / "json").read_text())
        if splits is not None and meta.get("split", "train") not in splits:
            continue
        yield {"key": folder.name, "image": (folder / "image.png").read_bytes(),
               "mask": (folder / "mask.png").read_bytes() if (folder / "mask.png").is_file() else None,
               "meta": meta,
               "source": (folder / "source.png").read_bytes() if (folder / "source.png").is_file() else None,
               "kind": "folder"}
    if any(path.glob("*/json")):
        return
    for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        defect_type = file.parent.name if file.parent != path else "all"
        yield {"key": f"{defect_type}/{file.stem}", "image": file.read_bytes(), "mask": None,
               "meta": {"defect_type": defect_type}, "source": None, "kind": "images"}


def safe_key(text: str) -> str:
    """WebDataset keys may not hold dots or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


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
                   dtype: torch.dtype = torch.float32, mask_gating: bool = True):
    """A StableDiffusionPipeline with the trained LoRA, learned tokens and mask gating loaded.

    Either `run` (a run directory or an export folder; the base model defaults to the one the
    export names) or `base_model` with `lora` (a .safetensors file or its folder) and/or
    `embeddings` (learned_embeds/<token>.safetensors files). Returns (pipe, {defect_type: token},
    info dict).
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
    pipe = StableDiffusionPipeline.from_pretrained(base_model, torch_dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    if export_dir is not None:
        load_export(pipe, export_dir, mask_gating=mask_gating)
        tokens = dict(meta.get("tokens", {}))
    else:
        tokens = {}
        if lora:
            lora_path = Path(lora)
            if lora_path.is_file():
                pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
            else:
                pipe.load_lora_weights(str(lora_path))
            if mask_gating:
                enable_mask_gating(pipe.unet)
        for item in embeddings or []:  # TYPE=FILE, FILE or FOLDER; without a TYPE the token names it
            defect_type, _, file = item.rpartition("=") if "=" in item else ("", "", item)
            path = Path(file)
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
            if not files or not all(f.is_file() for f in files):
                raise FileNotFoundError(f"--embeddings {item}: no such .safetensors file or folder of them.")
            for f in files:
                token = _token_of(f)
                tokens[defect_type or token] = token
        if tokens:
            pipe.load_textual_inversion(sorted({str(f) for f in _embedding_files(embeddings)}))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    info = {"export": str(export_dir) if export_dir else "", "base_model": str(Path(base_model).resolve()),
            "resolution_px": meta.get("resolution_px"), "lora": lora or "", "embeddings": embeddings or []}
    return pipe, tokens, info


def _token_of(path: Path) -> str:
    """The token a diffusers textual-inversion file defines: its single key (else its file name)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return path.stem
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return keys[0] if len(keys) == 1 else path.stem


def _embedding_files(items: list[str]) -> list[Path]:
    out = []
    for item in items:
        path = Path(item.rpartition("=")[2] if "=" in item else item)
        out += sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return out


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
                 settings: GenerationSettings, *, mask_pool: dict[str, list[tuple[np.ndarray, str, str]]],
                 sources: list[tuple[np.ndarray, str, str]], default_category: str) -> list[SampleSpec]:
    """Every sample's key, prompt, seed, mask and source; deterministic given the flags.

    mask_pool: {defect_type or "*": [(mask, origin, category)]} for file and data-set masks.
    sources: [(image, origin, category)] good images for inpainting.
    """
    all_types = sorted(tokens)
    r = settings.resolution_px
    specs = []
    for defect_type in defect_types:
        type_index = all_types.index(defect_type)
        pool = mask_pool.get(defect_type) or mask_pool.get("*") or []
        if settings.mask_source != "procedural" and not pool:
            raise ValueError(f"There are no masks of defect type {defect_type!r} (found: "
                             f"{', '.join(sorted(mask_pool))}); name the embeddings TYPE=FILE to match, or "
                             "put masks in a folder named after the type.")
        for i in range(num_per_type):
            seed = settings.seed + SEED_STRIDE * type_index + i
            rng = np.random.default_rng([seed, zlib.crc32(defect_type.encode())])
            source, source_origin, category = None, "", default_category
            if settings.mode == "inpaint":
                source, source_origin, category = sources[(i * len(all_types) + type_index) % len(sources)]
            if settings.mask_source == "procedural":
                region = object_region(source) if source is not None else None
                mask = random_mask(r, r, rng, region, settings.mask_kind, tuple(settings.mask_size))
                mask_origin = f"procedural:{settings.mask_kind}"
            else:
                mask, mask_origin, mask_category = pool[i % len(pool)]
                if source is None:
                    category = mask_category or category
            token = tokens[defect_type]
            prompt = settings.prompt.format(token=token, defect_type=defect_type, category=category)
            specs.append(SampleSpec(key=f"{safe_key(defect_type)}-{i:06d}", defect_type=defect_type, token=token,
                                    prompt=prompt, seed=seed, category=category, mask=mask,
                                    mask_origin=mask_origin, source=source, source_origin=source_origin))
    return specs


def load_mask_pool(kind: str, path: str | None, size: int) -> dict[str, list[tuple[np.ndarray, str, str]]]:
    """Masks by defect type from a folder of PNGs (subfolders name types) or a data set's masks."""
    if kind == "procedural":
        return {}
    if not path:
        flag = "--mask-dir" if kind == "files" else "--data"
        raise ValueError(f"--masks {kind} needs {flag} DIR.")
    pool: dict[str, list] = {}
    if kind == "files":
        folder = Path(path)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        for f in files:
            defect_type = f.parent.name if f.parent != folder else "*"
            pool.setdefault(defect_type, []).append((load_mask(f, size), str(f), ""))
    else:
        for sample in iter_dataset(path):
            if sample["mask"] is None:
                continue
            mask = load_mask(sample["mask"], size)
            if mask.any():
                meta = sample["meta"]
                pool.setdefault(meta.get("defect_type", "*"), []).append(
                    (mask, f"{path}:{sample['key']}", meta.get("category", "")))
    if not pool:
        raise ValueError(f"{path} holds no non-empty masks; pass a folder of mask PNGs or a data set "
                         "with defect masks.")
    return pool


def load_sources(path: str | None, size: int) -> list[tuple[np.ndarray, str, str]]:
    """Good images for inpainting: a folder of images, or the defect-free samples of a data set."""
    if not path:
        raise ValueError("--mode inpaint needs --sources DIR (good images, or a data set's good samples).")
    out = []
    for sample in iter_dataset(path):
        meta = sample["meta"]
        is_good = sample["kind"] == "images" or meta.get("defect_type") == "good" or (
            sample["mask"] is not None and not load_mask(sample["mask"]).any())
        if is_good:
            out.append((load_rgb(sample["image"], size), f"{path}:{sample['key']}", meta.get("category", "")))
    if not out:
        raise ValueError(f"{path} holds no good (defect-free) images to inpaint into; pass a folder of "
                         "images or a data set with defect_type 'good' samples.")
    return out


# ---- writing ---------------------------------------------------------------------------------

def sample_done(out_dir: Path, key: str) -> bool:
    return (out_dir / "samples" / key / "json").is_file()


def write_sample(out_dir: Path, spec: SampleSpec, image: np.ndarray, settings: GenerationSettings,
                 raw: np.ndarray | None = None) -> Path:
    """Writes samples/<key>/ under a temporary name and renames it, so a folder that exists is complete."""
    final = out_dir / "samples" / spec.key
    tmp = out_dir / "samples" / f".{spec.key}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    Image.fromarray(image).save(tmp / "image.png")
    Image.fromarray(spec.mask * 255).save(tmp / "mask.png")
    (tmp / "caption.txt").write_text(spec.prompt)
    generation = {k: v for k, v in asdict(settings).items()}
    generation.update(prompt=spec.prompt, seed=spec.seed, token=spec.token, mask_origin=spec.mask_origin,
                      source_image=spec.source_origin)
    if spec.source is not None:
        Image.fromarray(spec.source).save(tmp / "source.png")
        if raw is not None:  # how well the model alone kept to the mask; after compositing it is 1.0
            generation["mask_localisation_before_composite"] = mask_localisation(raw, spec.source, spec.mask)
    meta = {"category": spec.category, "defect_type": spec.defect_type, "source": "generated",
            "split": "train", "size": list(image.shape[1::-1]), "generation": generation}
    (tmp / "json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def mask_localisation(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float | None:
    """The share of the absolute pixel change from `source` that lies inside `mask` (None: no change)."""
    changed = np.abs(image.astype(np.int32) - source.astype(np.int32)).sum(-1)
    total = changed.sum()
    return float((changed * mask.astype(bool)).sum() / total) if total > 0 else None


def write_shards(out_dir: Path, tokens: dict[str, str], shard_size: int) -> list[Path]:
    """Packs every finished sample folder into shards/train-NNNNNN.tar + manifest.json (rewritten whole)."""
    import webdataset as wds

    folders = sorted(p.parent for p in (out_dir / "samples").glob("*/json"))
    tmp = out_dir / "shards.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: dict[str, int] = {}
    shards: list[str] = []
    for start in range(0, len(folders), shard_size):
        name = f"train-{start // shard_size:06d}.tar"
        shards.append(name)
        with wds.TarWriter(str(tmp / name)) as sink:
            for folder in folders[start:start + shard_size]:
                meta = json.loads((folder / "json").read_text())
                counts[meta["defect_type"]] = counts.get(meta["defect_type"], 0) + 1
                sink.write({"__key__": folder.name, "image.png": (folder / "image.png").read_bytes(),
                            "mask.png": (folder / "mask.png").read_bytes(),
                            "caption.txt": (folder / "caption.txt").read_text(), "json": meta})
    manifest = {"source": "generated", "splits": {"train": {"shards": shards, "num_samples": len(folders)}},
                "defect_tokens": tokens, "defect_types": counts}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    final = out_dir / "shards"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return [final / s for s in shards]


def check_resume(out_dir: Path, settings: GenerationSettings) -> None:
    """A folder may only be resumed with the settings it was started with."""
    path = out_dir / SETTINGS_FILE
    current = json.loads(json.dumps(asdict(settings)))
    if path.is_file():
        old = json.loads(path.read_text())
        for key, value in current.items():
            if key not in ("precision",) and old.get(key) != value:
                raise ValueError(f"{out_dir} was generated with {key}={old.get(key)!r}, not {value!r}; resume "
                                 "with the same flags or write to a new folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n")


# ---- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from defect_ds.report import save_sample_grid

    device, dtype = resolve_device(args.device, args.precision)
    pipe, tokens, info = build_pipeline(run=args.run, base_model=args.base_model, lora=args.lora,
                                        embeddings=args.embeddings, device=device, dtype=dtype,
                                        mask_gating=not args.no_mask_gating)
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
        negative_prompt=args.negative_prompt, seed=args.seed, mask_source=args.masks, mask_kind=args.mask_kind,
        mask_size=tuple(args.mask_size), precision="bf16" if dtype == torch.bfloat16 else "fp32",
        export=info["export"], base_model=info["base_model"])
    out_dir = Path(args.out_dir)
    check_resume(out_dir, settings)
    set_scheduler(pipe, settings.scheduler)
    inpaint_pipe = None
    if settings.mode == "inpaint":
        from diffusers import StableDiffusionInpaintPipeline

        inpaint_pipe = StableDiffusionInpaintPipeline(**pipe.components)  # same modules, LoRA and tokens
        inpaint_pipe.set_progress_bar_config(disable=True)
    pool = load_mask_pool(settings.mask_source, args.mask_dir or args.data, settings.resolution_px)
    sources = load_sources(args.sources, settings.resolution_px) if settings.mode == "inpaint" else []
    specs = plan_samples(tokens, defect_types, args.num_per_type, settings, mask_pool=pool, sources=sources,
                         default_category=args.category)
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
    shards = write_shards(out_dir, tokens, args.shard_size)
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
                     "files (TYPE=FILE names the defect type; else the token does) or their folder")
    src.add_argument("--no-mask-gating", action="store_true", help="let the LoRA act on the whole image")
    what = p.add_argument_group("what to generate")
    what.add_argument("--mode", choices=MODES, default="text2img")
    what.add_argument("--defect-types", help="comma-separated defect types (default: every learned token)")
    what.add_argument("--num-per-type", type=int, default=8, help="samples per defect type")
    what.add_argument("--prompt", default=GenerationSettings.prompt,
                      help="prompt template with {token}, {defect_type}, {category}")
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
    return run(args)
