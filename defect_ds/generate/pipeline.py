"""The diffusers pipeline of `defect-ds generate`: trained weights loaded, one batch denoised.

Two modes. text2img: the prompt with the defect's learned token and a mask draw a whole new image;
the mask gates the LoRA, so the fine-tuned defect appears there. inpaint: a defect is painted into
a given good image; the latents outside the mask's latent cells are held to the source's while
denoising (`latent_cells`), and the decoded result is composited in pixel space
(`mask * generated + (1 - mask) * source`), so every pixel outside the mask is the source's, bit for
bit, and the mask is an exact label. The pipeline itself is built by `model/sampling.py`.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defect_ds.data.captions import DEFAULT_TOKEN_PREFIX
from defect_ds.generate.spec import GenerationSettings, SampleSpec
from defect_ds.model.components import check_model_dir
from defect_ds.model.mask_gating import enable_mask_gating, mask_context
from defect_ds.model.sampling import load_pipeline
from defect_ds.train.export import (LORA_FILE, check_embedding_files, check_lora_file, find_export, load_export,
                                    read_export_meta)


def planned_resolution(*, run: str | None = None, base_model: str | None = None) -> int:
    """The resolution `build_pipeline`'s model generates at by default, read from export.json or the model
    folder's configs, so inputs can be read and checked before the (slow) model load."""
    meta = read_export_meta(find_export(run)) if run else {}
    if meta.get("resolution_px"):
        return int(meta["resolution_px"])
    base = base_model or meta.get("base_model")
    if not base:
        raise ValueError("No base model: the export names none, so give base_model (a diffusers Stable Diffusion folder).")
    folder = check_model_dir(base)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)  # diffusers' vae_scale_factor


def build_pipeline(*, run: str | None = None, base_model: str | None = None, lora: str | None = None,
                   embeddings: list[str] | None = None, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32, mask_gating: bool = True,
                   mask_resize: str | None = None, base_only: bool = False):
    """A StableDiffusionPipeline with the trained LoRA (or UNet), learned tokens and mask gating loaded.

    Either `run` (a run directory or an export folder; the base model defaults to the one the
    export names) or `base_model` with `lora` (a .safetensors file or its folder) and/or
    `embeddings` (see `resolve_embeddings`). Returns (pipe, {defect_type: token}, info) where info
    records where the weights came from and how the mask gates them.
    mask_resize: how the gate resizes masks (None: as the export.json of the weights says, else nearest,
    the default of exports older than the field).
    """
    meta: dict = {}
    export_dir = None
    if run:
        export_dir = find_export(run)
        meta = read_export_meta(export_dir)
        base_model = base_model or meta.get("base_model")
    elif not (lora or embeddings or (base_only and base_model)):
        raise ValueError("Nothing to generate with: give run (a run or export folder), or base_model with lora "
                         "and/or embeddings.")
    if not base_model:
        raise ValueError("No base model: the export names none, so give base_model (a diffusers Stable Diffusion folder).")
    check_model_dir(base_model)
    loose = resolve_embeddings(embeddings or [])  # checked before the (slow) model load
    pipe = load_pipeline(base_model, dtype)
    lora_file = ""
    if export_dir is not None:
        load_export(pipe, export_dir, mask_gating=mask_gating, mask_resize=mask_resize)
        tokens = dict(meta.get("tokens", {}))
    else:
        tokens = {t: token for t, (token, _) in loose.items()}
        if lora:
            lora_path = Path(lora)
            if not lora_path.exists():
                raise FileNotFoundError(f"The LoRA file {lora} does not exist; give pytorch_lora_weights.safetensors "
                                        "or the folder holding it.")
            weights = lora_path if lora_path.is_file() else lora_path / LORA_FILE
            if weights.is_file():  # else diffusers names what it looked for
                check_lora_file(pipe.unet, weights)
            if lora_path.is_file():
                pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
            else:
                pipe.load_lora_weights(str(lora_path))
            lora_file = str(lora_path.resolve())
            if mask_gating:
                enable_mask_gating(pipe.unet, mask_resize or _trained_mask_resize(lora_path))
        if loose:
            check_embedding_files(pipe.text_encoder, sorted({f for _, f in loose.values()}))
            pipe.load_textual_inversion(sorted({str(f) for _, f in loose.values()}))
    pipe.to(device)
    gate = getattr(pipe.unet, "mask_gate", None)
    info = {"export": str(export_dir) if export_dir else "", "export_step": meta.get("step"),
            "base_model": str(Path(base_model).resolve()), "resolution_px": meta.get("resolution_px"),
            "lora": lora_file, "embeddings": [f"{t}={f.resolve()}" for t, (_, f) in sorted(loose.items())],
            "mask_gating": gate is not None, "mask_resize": gate.resize if gate is not None else ""}
    return pipe, tokens, info


def resolve_embeddings(items: list[str]) -> dict[str, tuple[str, Path]]:
    """{defect_type: (token, file)} from embeddings items: TYPE=FILE, FILE or FOLDER of files.

    Without TYPE=, the defect type comes from the export.json beside the file's folder or above it
    (its tokens map, defect type -> token), else from the token with the project's token prefix
    (`sks_crack` -> `crack`, as data/captions.py names tokens); a token that is neither must be named.
    """
    out: dict[str, tuple[str, Path]] = {}
    for item in items:
        named, sep, rest = item.partition("=")
        typed = bool(sep) and named and "/" not in named
        defect_type, path = (named, Path(rest)) if typed else ("", Path(item))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"Embeddings {item}: no such .safetensors file or folder of them.")
        if defect_type and len(files) > 1:
            raise ValueError(f"Embeddings {item}: TYPE= names one file, but {path} holds {len(files)}; "
                             "give one TYPE=FILE per defect type.")
        for f in files:
            token = _token_of(f)
            found = defect_type or _type_from_export(f, token)
            if not found and token.startswith(DEFAULT_TOKEN_PREFIX) and len(token) > len(DEFAULT_TOKEN_PREFIX):
                found = token[len(DEFAULT_TOKEN_PREFIX):]
            if not found:
                raise ValueError(f"Embeddings {item}: the defect type of token {token!r} is unknown (no "
                                 f"export.json beside it, no {DEFAULT_TOKEN_PREFIX!r} prefix); write "
                                 f"the item as TYPE={f}.")
            if found in out and out[found][1] != f:
                raise ValueError(f"The embeddings give defect type {found!r} twice ({out[found][1]} and {f}); "
                                 "give each type one file.")
            out[found] = (token, f)
    return out


def _type_from_export(file: Path, token: str) -> str:
    """The defect type whose token is `token` in an export.json next to or above the file's folder."""
    for folder in (file.parent, file.parent.parent):
        try:
            tokens = read_export_meta(folder).get("tokens", {})
        except FileNotFoundError:
            continue
        return next((t for t, tok in tokens.items() if tok == token), "")
    return ""


def _trained_mask_resize(lora_path: Path) -> str:
    """How the run that wrote a loose LoRA gated its masks: the export.json beside it says, else nearest
    (the default before exports recorded it)."""
    folder = lora_path if lora_path.is_dir() else lora_path.parent
    try:
        return read_export_meta(folder).get("mask_resize", "nearest")
    except FileNotFoundError:
        return "nearest"


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
    device = pipe.device
    r = settings.resolution_px
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]  # same noise on any device
    masks = torch.from_numpy(np.stack([s.mask for s in specs])).float()[:, None]  # (B, 1, R, R)
    gated = getattr(pipe.unet, "mask_gate", None) is not None
    kwargs = dict(prompt=[s.prompt for s in specs], negative_prompt=[settings.negative_prompt] * len(specs),
                  height=r, width=r, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                  generator=generators, output_type="np")
    with mask_context(pipe.unet, masks.to(device, pipe.unet.dtype)) if gated else contextlib.nullcontext():
        if settings.mode == "text2img":
            out = pipe(**kwargs).images
        else:
            sources = [Image.fromarray(s.source) for s in specs]
            factor = inpaint_pipe.vae_scale_factor
            cells = settings.inpaint_mask != "nearest"  # nearest: diffusers shrinks the exact mask itself
            mask_images = [Image.fromarray((latent_cells(s.mask, factor) if cells else s.mask.astype(np.uint8)) * 255)
                           for s in specs]
            out = inpaint_pipe(image=sources, mask_image=mask_images, strength=settings.strength, **kwargs).images
    raws = [(np.clip(np.asarray(o, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8) for o in out]
    if settings.mode == "text2img":
        return [(raw, raw) for raw in raws]
    return [(composite(raw, s.source, s.mask), raw) for raw, s in zip(raws, specs)]


def latent_cells(mask: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (R, R): every latent cell (factor x factor pixels) that the mask touches.

    diffusers' inpainting pipeline shrinks its mask to the latent grid by nearest sampling, which keeps
    one pixel of each cell: a 1-px scratch loses half its cells or all of them, and there the pipeline
    holds the latents to the source's at every step, so nothing is drawn. Given these cells instead, it
    frees every latent the defect touches; the pixel composite still uses the exact mask."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    cells = torch.nn.functional.max_pool2d(m, factor, ceil_mode=True)
    full = torch.nn.functional.interpolate(cells, scale_factor=factor, mode="nearest")
    return full[0, 0, :m.shape[-2], :m.shape[-1]].numpy().astype(np.uint8)


def composite(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """mask * generated + (1 - mask) * source on uint8 pixels: outside the mask exactly the source."""
    return np.where(mask[..., None].astype(bool), generated, source)
