"""Precomputed latents: image shards encoded once by the VAE into latent shards the trainer streams.

    defect-ds prepare latents work/data/synthetic/shards work/data/synthetic/latents --pretrained work/sd15 \\
        --resolution-px 512 --batch-size 16 --device cuda

At 512 px the VAE encoder costs more FLOPs (about 1.1 TFLOP per image) than a UNet forward pass
(about 0.8), so encoding every image once instead of every step roughly halves a LoRA step.

A latent shard has the names of an image shard (`{train,val}-NNNNNN.tar` and `manifest.json`) and per
sample `latent.npy` (float16: the VAE posterior's mean and log-variance stacked, 2 x C x R/8 x R/8,
or the mean alone, C x R/8 x R/8, with --mean-only), `latent_hflip.npy` (the same for the horizontally flipped image:
the VAE is not flip-equivariant, so flipping the latents would not match), `mask.png` (resized and
cropped to R x R), `caption.txt`, `json`, and with --text-embeddings `text_embeds.npy` (float16,
77 x D: the frozen text encoder's output for the caption; usable only when no tokens are learned).
The manifest says `"kind": "latents"`, the resolution and the VAE scaling factor. Latents are stored
unscaled: the trainer multiplies by the scaling factor, as it does for latents it encodes itself.
Images are resized and centre-cropped exactly as the loader does it (`data/transforms.py`: short side to R,
bilinear with antialiasing, masks nearest), so random crops and vertical flips are not available from
latent shards.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from defect_ds.config import DataConfig
from defect_ds.data.reader import read_shards, shard_paths
from defect_ds.data.sample import MASK_THRESHOLD, mask_array, png_bytes, read_sample_bytes
from defect_ds.data.shards import ShardWriter, build_manifest, prepare_out_dir, read_manifest, write_manifest
from defect_ds.data.transforms import image_tensors
from defect_ds.model.components import check_model_dir, tokenize
from defect_ds.utils.device import resolve_device
from defect_ds.utils.files import folder_fingerprint

LATENT = "latent.npy"
LATENT_HFLIP = "latent_hflip.npy"
TEXT_EMBEDS = "text_embeds.npy"
KIND = "latents"


# ---- the command --------------------------------------------------------------------------------
def add_prepare_command(prepare_subparsers: argparse._SubParsersAction) -> None:
    """Adds `latents` to `defect-ds prepare`."""
    p = prepare_subparsers.add_parser("latents", help="encode image shards once into VAE latent shards",
                                      description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC_SHARDS", help="folder of image shards with manifest.json")
    p.add_argument("out", metavar="OUT", help="output folder for the latent shards and manifest.json")
    p.add_argument("--pretrained", required=True, metavar="MODEL_DIR", help="diffusers Stable Diffusion folder")
    p.add_argument("--resolution-px", type=int, default=512, help="training resolution (square, multiple of 8)")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--text-embeddings", action="store_true",
                   help="also store the frozen text encoder's caption embeddings (only for runs learning no tokens)")
    p.add_argument("--no-hflip", action="store_true", help="do not store latents of the flipped images")
    p.add_argument("--mean-only", action="store_true",
                   help="store the posterior mean only (half the size; no sampling at load time)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no per-shard progress lines")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    manifest = encode_shards(args.src, args.out, args.pretrained, resolution_px=args.resolution_px,
                             batch_size=args.batch_size, device=args.device, hflip=not args.no_hflip,
                             text_embeddings=args.text_embeddings, mean_only=args.mean_only,
                             overwrite=args.overwrite, progress=not args.no_progress)
    total = sum(sum(c.values()) for c in manifest["counts"].values())
    print(f"wrote {total} latent samples ({manifest['latent_shape']}) to {args.out}")
    return 0


# ---- encoding -----------------------------------------------------------------------------------
def codec_fingerprint(pretrained_dir: str | Path) -> str:
    """The fingerprint of a model folder's codec: its vae/ weights and config, less where it was loaded from."""
    return folder_fingerprint(Path(pretrained_dir) / "vae", ignore_config_keys=("_name_or_path", "_diffusers_version"))


def check_codec(manifest: dict, shards_dir: str | Path, pretrained_dir: str | Path) -> None:
    """Latent shards hold one codec's latents: training them on a base whose VAE differs (another fingerprint;
    for shards written before fingerprints, another scaling factor) is refused in one sentence. Image shards
    and a base that shares the codec (`pretrain-base --vae-from`) pass."""
    if manifest.get("kind") != KIND:
        return
    source = manifest.get("latent_source") or {}
    vae_dir = Path(pretrained_dir) / "vae"
    if source.get("codec_fingerprint"):
        same = source["codec_fingerprint"] == codec_fingerprint(pretrained_dir)
    else:
        config = json.loads((vae_dir / "config.json").read_text()) if (vae_dir / "config.json").is_file() else {}
        same = not ("scaling_factor" in manifest and "scaling_factor" in config) or math.isclose(
            manifest["scaling_factor"], config["scaling_factor"], rel_tol=1e-6)
    if not same:
        raise ValueError(f"{shards_dir} holds latents encoded with the codec of {source.get('pretrained', 'another model')}"
                         f", not of model.pretrained_dir {pretrained_dir}; encode the image shards again with "
                         f"`defect-ds prepare latents IMAGES {shards_dir} --pretrained {pretrained_dir} --overwrite`.")


def encode_shards(src_dir: str | Path, out_dir: str | Path, pretrained_dir: str | Path, *,
                  resolution_px: int = 512, batch_size: int = 8, device: str = "auto", hflip: bool = True,
                  text_embeddings: bool = False, mean_only: bool = False, overwrite: bool = False,
                  progress: bool = False) -> dict[str, Any]:
    """Encodes every sample of the image shards in `src_dir` into latent shards in `out_dir`.

    Splits, keys, masks, captions and records are kept; returns the manifest (written last).
    """
    from diffusers import AutoencoderKL

    if resolution_px < 8 or resolution_px % 8:
        raise ValueError(f"--resolution-px={resolution_px} is invalid; use a multiple of 8 such as 512.")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} is invalid; use 1 or more.")
    source = read_manifest(src_dir)
    if source.get("kind") == KIND:
        raise ValueError(f"{src_dir} already holds latent shards; pass a folder of image shards.")
    model_dir = check_model_dir(pretrained_dir)
    dev = resolve_device(device)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(dev).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution_px % factor:
        raise ValueError(f"--resolution-px={resolution_px} is not a multiple of the VAE's downsampling "
                         f"factor {factor}; use e.g. {resolution_px // factor * factor or factor}.")
    text = _TextEncoder(model_dir, dev) if text_embeddings else None

    out = prepare_out_dir(out_dir, overwrite)
    writer = ShardWriter(out)
    try:
        for split, path in shard_paths(Path(src_dir), source):
            n = 0
            for batch in _batched(_read_shard(path, resolution_px), batch_size):
                for encoded, defect_type in _encode_batch(batch, vae, text, dev, hflip, mean_only):
                    writer.write(split, encoded, defect_type)
                    n += 1
            if progress:
                print(f"encoded {n} samples of {path.name}", file=sys.stderr)
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    latent_channels = vae.config.latent_channels
    extra = {k: v for k, v in source.items() if k not in ("format", "kind", "counts", "shards")}
    extra.update(
        kind=KIND, created_by="prepare latents", resolution_px=resolution_px,
        scaling_factor=float(vae.config.scaling_factor), latent_channels=latent_channels,
        latent_shape=([] if mean_only else [2]) + [latent_channels, resolution_px // factor, resolution_px // factor],
        latent_stored="mean" if mean_only else "moments", hflip_latents=hflip, text_embeddings=text_embeddings,
        latent_source={"shards": str(src_dir), "pretrained": str(model_dir),
                       "codec_fingerprint": codec_fingerprint(model_dir)})
    split_file = (extra.get("split") or {}).get("file") if isinstance(extra.get("split"), dict) else None
    if split_file and (Path(src_dir) / split_file).is_file():  # the split record the manifest points to
        shutil.copyfile(Path(src_dir) / split_file, out / split_file)
    manifest = build_manifest(shards, **extra)
    write_manifest(out, manifest)
    return manifest


def _read_shard(path: Path, resolution_px: int) -> Iterator[dict[str, Any]]:
    """Samples of one image shard as the loader would feed them to the VAE: unflipped and centre-cropped."""
    for raw in read_shards([path]):
        image, mask, caption, record = read_sample_bytes(raw)
        pixels, mask_t = image_tensors(image, mask, resolution_px)
        mask_image = Image.fromarray(mask_t[0].numpy().astype(np.uint8) * 255)
        yield {"key": raw["__key__"], "pixels": pixels, "mask": mask_image, "caption": caption, "record": record}


def _batched(items: Iterator[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _encode_batch(batch: list[dict[str, Any]], vae: torch.nn.Module, text: "_TextEncoder | None",
                  device: torch.device, hflip: bool, mean_only: bool) -> Iterator[tuple[dict[str, Any], str]]:
    pixels = torch.stack([s["pixels"] for s in batch]).to(device)
    if hflip:  # one VAE call for the images and their mirror images
        pixels = torch.cat([pixels, pixels.flip(-1)])
    dist = vae.encode(pixels).latent_dist
    stored = (dist.mean if mean_only else torch.stack([dist.mean, dist.logvar], dim=1)).half().cpu().numpy()
    embeds = text.encode([s["caption"] for s in batch]) if text is not None else None
    n = len(batch)
    for i, s in enumerate(batch):
        encoded = {"__key__": s["key"], LATENT: _npy_bytes(stored[i]),
                   "mask.png": png_bytes(s["mask"]), "caption.txt": s["caption"].encode("utf-8"),
                   "json": json.dumps(s["record"], sort_keys=True).encode("utf-8")}
        if hflip:
            encoded[LATENT_HFLIP] = _npy_bytes(stored[n + i])
        if embeds is not None:
            encoded[TEXT_EMBEDS] = _npy_bytes(embeds[i])
        yield encoded, str(s["record"].get("defect_type", "unknown"))


class _TextEncoder:
    """The frozen CLIP text encoder: caption -> (77, D) hidden states, as the trainer computes them."""

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.model = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(device).eval()
        self.device = device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, captions).to(self.device)
        return self.model(ids)[0].half().cpu().numpy()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# ---- loading ------------------------------------------------------------------------------------
def transform_latent_sample(sample: dict[str, Any], cfg: DataConfig, flip: bool,
                            generator: torch.Generator | None = None) -> dict[str, Any]:
    """One latent-shard sample -> training tensors; what the loader calls instead of the image path.

    `sample` holds the shard files as bytes or already decoded (arrays, PIL images, str, dict).
    Returns `latents` float32 (C, R/8, R/8), unscaled, drawn from the stored posterior (or its mean
    with --mean-only); `mask` float32 (1, R, R) of 0/1; both mirrored when `flip` (from the stored
    flipped encoding when there is one); `caption`, `defect_type`, `key`; `text_embeds` float32 if stored.
    """
    key = sample.get("__key__", sample.get("key", "?"))
    where = f"latent sample {key!r} of {sample.get('__url__', '?')}"
    if cfg.vflip or cfg.random_crop:
        field = "data.vflip" if cfg.vflip else "data.random_crop"
        raise ValueError(f"{field}=true cannot be used with latent shards (crops and flips are fixed at "
                         f"encoding); set {field}=false or train from image shards.")
    for name in (LATENT, "mask.png", "caption.txt", "json"):
        if name not in sample:
            raise ValueError(f"{where} lacks {name}; re-run `defect-ds prepare latents`.")
    stored_flip = flip and sample.get(LATENT_HFLIP) is not None
    moments = torch.from_numpy(_as_array(sample[LATENT_HFLIP if stored_flip else LATENT]).astype(np.float32))
    if flip and not stored_flip:
        moments = moments.flip(-1)  # approximate: this shard was written with --no-hflip
    mask = torch.from_numpy(_mask_array(sample["mask.png"])).float()[None]
    if mask.shape[-1] != cfg.resolution_px:
        raise ValueError(f"{where} was encoded at {mask.shape[-1]} px but data.resolution_px="
                         f"{cfg.resolution_px}; set data.resolution_px={mask.shape[-1]} or re-run "
                         f"`defect-ds prepare latents --resolution-px {cfg.resolution_px}`.")
    if flip:
        mask = mask.flip(-1)
    record = sample["json"]
    if isinstance(record, (bytes, bytearray, str)):
        record = json.loads(record)
    caption = sample["caption.txt"]
    if isinstance(caption, (bytes, bytearray)):
        caption = caption.decode("utf-8", errors="replace")
    out = {"latents": sample_latents(moments, generator), "mask": mask, "caption": caption.strip(),
           "defect_type": record.get("defect_type"), "key": key}
    if sample.get(TEXT_EMBEDS) is not None:
        out["text_embeds"] = torch.from_numpy(_as_array(sample[TEXT_EMBEDS]).astype(np.float32))
    return out


def sample_latents(stored: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from the stored posterior: mean + std * noise for moments (2, C, h, w), else the mean (C, h, w)."""
    if stored.dim() == 3:
        return stored.contiguous()
    mean, logvar = stored[0], stored[1]
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp diffusers' posterior applies
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, (bytes, bytearray)):
        return np.load(io.BytesIO(value), allow_pickle=False)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


def _mask_array(value: Any) -> np.ndarray:
    """A (R, R) bool array from PNG bytes, a PIL image, or a decoded array (uint8 0/255 or float 0/1)."""
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        return mask_array(value)
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    array = array.squeeze()
    if array.ndim == 3:  # decoded as RGB: channels first or last
        array = array[0] if array.shape[0] in (3, 4) else array[..., 0]
    return array >= (MASK_THRESHOLD if array.dtype == np.uint8 else 0.5)
