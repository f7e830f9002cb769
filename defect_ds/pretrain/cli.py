"""`defect-ds pretrain-base`: a small Stable-Diffusion-format base trained from scratch on good images.

    defect-ds pretrain-base work/data/base models/tiny-defect-base
    defect-ds pretrain-base work/data/base work/base --recipe.vae_steps=300 --recipe.unet_steps=500
    defect-ds pretrain-base work/data/base work/base-attention-32 --config configs/base-attention-32.toml \
      --vae-from models/tiny-defect-base

Stage 1 trains the VAE and computes its scaling factor from the data's latents; stage 2 trains the
UNet and the text encoder on the good images and their captions only (defect images in DATA are left
out, so a few-shot fine-tune on defects stays honest). OUT ends as a diffusers folder that
`StableDiffusionPipeline.from_pretrained(OUT)` loads offline, with recipe.json, train_log.jsonl,
reconstruction.json and samples.png. Interrupted runs resume from OUT/train_state/ when run again.
Settings are `PretrainConfig`'s [recipe] and [run] (`--config FILE.toml`, `--section.field=value`, each
flag an alias of one field; `--recipe FILE.json` sets [recipe] from a recipe JSON).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from defect_ds.config import add_alias, add_config_argument, alias_values, load_config
from defect_ds.data.reader import iter_dataset, load_rgb
from defect_ds.data.sample import GOOD
from defect_ds.model.components import tokenize
from defect_ds.model.sampling import assemble_pipeline, generate, load_pipeline, set_scheduler
from defect_ds.model.tiny import SCHEDULER, make_tokenizer
from defect_ds.pretrain import stages
from defect_ds.pretrain.recipe import PretrainConfig, read_recipe
from defect_ds.utils.device import cpu_has_native_bf16
from defect_ds.utils.files import atomic_folder, atomic_write_json, atomic_write_text, disk_full_as_sentence
from defect_ds.utils.quiet import quiet_libraries

STATE = "train_state"
RESUME_ADVICE = "free space and rerun the same command to resume"
SAMPLE_SEEDS = 4


def load_good(data: str | Path, split: str, resolution_px: int | None) -> tuple[torch.Tensor, list[str], int]:
    """(uint8 images N,3,H,W, captions, defect images left out) of one split of a shards folder."""
    images, captions, left_out = [], [], 0
    for item in iter_dataset(data, splits=(split,)):
        if item["meta"].get("defect_type") != GOOD:
            left_out += 1
            continue
        if item["caption"] is None:
            raise ValueError(f"Sample {item['key']} in {data} has no caption.txt; pretrain-base needs "
                             "training shards made by `defect-ds prepare`.")
        images.append(load_rgb(item["image"], resolution_px))
        captions.append(item["caption"])
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), [], left_out
    array = np.stack(images).transpose(0, 3, 1, 2)
    return torch.from_numpy(array.copy()), captions, left_out


class Progress:
    """One rich bar per stage and a JSON line per logged step in OUT/train_log.jsonl."""

    def __init__(self, out: Path, enabled: bool, log_every: int = 25):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.log = open(out / "train_log.jsonl", "a")
        self.enabled, self.log_every = enabled, log_every
        self.bar = self.task = None
        self.started = time.perf_counter()

    def stage(self, name: str, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.close_bar()
        self.name = name
        if self.enabled:
            self.bar = Bar(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("loss {task.fields[loss]}"), console=self.console)
            self.task = self.bar.add_task(name, total=total, completed=done, loss="-")
            self.bar.start()
        return self.on_step

    def on_step(self, step: int, values: dict) -> None:
        if step % self.log_every == 0 or "val_loss_ema" in values:
            record = {"stage": self.name, "step": step, "time_s": stages.elapsed_since(self.started), **values}
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{values['loss']:.4f}")

    def info(self, message: str) -> None:
        self.console.print(message)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        self.log.close()


def reconstruction_summary(vae, images: torch.Tensor) -> dict:
    recon = stages.reconstruct(vae, images)
    values = stages.psnr(recon, images)
    return {"psnr_db_mean": round(values.mean().item(), 2), "psnr_db_min": round(values.min().item(), 2),
            "images": len(images)}


def write_pipeline(out: Path, vae, text_encoder, tokenizer, unet, half: bool) -> None:
    """The diffusers folder, model_index.json last (a folder holding it is complete).

    half stores the UNet and the VAE in fp16; the text encoder stays fp32 either way. A plain
    `StableDiffusionPipeline.from_pretrained(out)` upcasts diffusers' models to fp32 but transformers
    (5.x) keeps the text encoder's stored dtype, and an fp16 text encoder feeding an fp32 UNet fails at
    the first call (Half and Float); it is the smallest of the three, so fp32 costs little."""
    from diffusers import DDPMScheduler

    if half:
        unet, vae = unet.to(torch.float16), vae.to(torch.float16)
    pipe = assemble_pipeline(vae, text_encoder.to(torch.float32), tokenizer, unet, DDPMScheduler(**SCHEDULER))
    tmp = out / "pipeline.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_libraries(), disk_full_as_sentence(out, RESUME_ADVICE):  # a "Writing model shards" bar each
        pipe.save_pretrained(tmp, safe_serialization=True)
    for part in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = out / part.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        part.rename(target)
    tmp.rmdir()


@torch.no_grad()
def write_sample_grid(out: Path, captions: list[str], steps: int = 30) -> Path:
    """One row per distinct caption, SAMPLE_SEEDS samples each, drawn by the saved pipeline."""
    from torchvision.utils import make_grid, save_image

    with quiet_libraries():
        pipe = load_pipeline(out)
    set_scheduler(pipe, "dpm++")
    prompts = sorted(set(captions))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = [generate(pipe, [prompt] * SAMPLE_SEEDS, resolution_px=size, steps=steps, seed=0, guidance_scale=3.0)
            for prompt in prompts]
    path = out / "samples.png"
    save_image(make_grid(torch.cat(rows), nrow=SAMPLE_SEEDS, padding=2), path)
    atomic_write_json(out / "samples.json", {"rows": prompts, "seeds_per_row": SAMPLE_SEEDS, "steps": steps,
                                             "guidance_scale": 3.0})
    return path


def read_config(args: argparse.Namespace) -> PretrainConfig:
    """Defaults, then --config, then --recipe, then the alias flags, then the --section.field=value overrides."""
    recipe_file = [{"recipe": read_recipe(args.recipe)}] if args.recipe else []
    return load_config(args.config, args.overrides, PretrainConfig(), [*recipe_file, alias_values(args)])


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = read_config(args)
    recipe, options = cfg.recipe, cfg.run
    if recipe.precision == "auto":
        recipe.precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if (out / "model_index.json").is_file() and not (out / STATE).is_dir():
        raise FileExistsError(f"{out} already holds a finished base model; choose another folder or delete it.")
    train_images, train_captions, left_out = load_good(args.data, "train", options.resolution_px or None)
    val_images, val_captions, val_left_out = load_good(args.data, "val", options.resolution_px or None)
    if len(train_images) < recipe.unet_batch_size:
        raise ValueError(f"{args.data} has {len(train_images)} good training images; pretrain-base needs at least "
                         f"{recipe.unet_batch_size} (make more with `defect-ds prepare synthetic --good-per-category`).")
    if not len(val_images):
        raise ValueError(f"{args.data} has no good images in its val split; the val loss needs some.")
    resolution = train_images.shape[-1]
    factor = 2 ** (len(recipe.vae_channels) - 1)
    if resolution % (factor * 2 ** (len(recipe.unet_channels) - 1)):
        raise ValueError(f"Images of {resolution} px do not divide into the recipe's grids; use a multiple of "
                         f"{factor * 2 ** (len(recipe.unet_channels) - 1)} px.")
    codec = reused_codec(options.vae_from, recipe) if options.vae_from else None
    state_dir = out / STATE
    state_dir.mkdir(parents=True, exist_ok=True)
    recipe_record = json.loads(recipe.to_json())
    recipe_record.update(data=str(args.data), resolution_px=resolution)
    if options.vae_from:
        recipe_record.update(vae_from=str(Path(options.vae_from).resolve()))
    saved = state_dir / "recipe.json"
    if saved.is_file() and json.loads(saved.read_text()) != recipe_record:
        raise ValueError(f"{out} holds an unfinished run with another recipe ({saved}); resume with the same "
                         "settings, or choose another OUT.")
    atomic_write_json(saved, recipe_record, sort_keys=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    progress = Progress(out, enabled=options.progress)
    progress.info(f"pretrain-base: {len(train_images)} good train images, {len(val_images)} val, {resolution} px; "
                  f"{left_out + val_left_out} defect images left out")

    vae_dir = state_dir / "vae"
    if (vae_dir / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir)
    elif codec is not None:
        vae = codec
        progress.info(f"vae: reused from {options.vae_from}")
        with atomic_folder(vae_dir, advice=RESUME_ADVICE) as tmp:
            vae.save_pretrained(tmp)
    else:
        vae = stages.train_vae(train_images, recipe, state_dir / "vae.pt",
                               progress.stage("vae", recipe.vae_steps, _done(state_dir / "vae.pt")))
        mean, std = stages.encode(vae, train_images)
        # the UNet expects unit-variance latents; SD's 0.18215 fits SD's VAE only
        vae.register_to_config(scaling_factor=round(1.0 / mean.std().item(), 5))
        with atomic_folder(vae_dir, advice=RESUME_ADVICE) as tmp:  # a vae/ that exists is complete: a crash
            vae.save_pretrained(tmp)  # while saving would otherwise leave one that fails every rerun
    vae.eval()
    progress.close_bar()
    recon = {"train": reconstruction_summary(vae, train_images), "val": reconstruction_summary(vae, val_images),
             "scaling_factor": vae.config.scaling_factor}
    atomic_write_json(out / "reconstruction.json", recon)
    progress.info(f"vae: val PSNR {recon['val']['psnr_db_mean']} dB, scaling factor {vae.config.scaling_factor}")

    from diffusers import DDPMScheduler

    tokenizer = make_tokenizer()
    torch.manual_seed(recipe.seed + 1)
    unet = stages.build_unet(recipe, resolution // factor, recipe.vae_latent_channels)
    text_encoder = stages.build_text_encoder(recipe, tokenizer)
    scheduler = DDPMScheduler(**SCHEDULER)
    sf = vae.config.scaling_factor
    train_set = stages.LatentSet(vae, train_images, tokenize(tokenizer, train_captions), sf)
    val_set = stages.LatentSet(vae, val_images, tokenize(tokenizer, val_captions), sf)
    empty = tokenize(tokenizer, [""])[0]
    unet, text_encoder = stages.train_unet(
        train_set, val_set, empty, unet, text_encoder, scheduler, recipe, state_dir / "unet.pt",
        progress.stage("unet", recipe.unet_steps, _done(state_dir / "unet.pt")))
    progress.close_bar()
    write_pipeline(out, vae, text_encoder, tokenizer, unet, half=options.save_fp16)
    atomic_write_text(out / "recipe.json", saved.read_text())
    grid = write_sample_grid(out, train_captions, steps=options.sample_steps)
    progress.info(f"wrote {out} (sample grid {grid})")
    progress.close()
    if not options.keep_state:
        shutil.rmtree(state_dir)
    return 0


def reused_codec(base: str, recipe):
    """The codec of a finished base (`--vae-from`), refused in one sentence when the recipe's UNet could not
    take its latents (another latent channel count or downsampling factor)."""
    from diffusers import AutoencoderKL

    folder = Path(base) / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--vae-from {base} has no vae/config.json; give a folder pretrain-base finished.")
    vae = AutoencoderKL.from_pretrained(folder)
    levels, channels = len(vae.config.block_out_channels), vae.config.latent_channels
    if levels != len(recipe.vae_channels) or channels != recipe.vae_latent_channels:
        raise ValueError(f"--vae-from {base} has a codec with {levels} levels and {channels} latent channels; the "
                         f"recipe asks for {len(recipe.vae_channels)} and {recipe.vae_latent_channels}.")
    return vae


def _done(state_path: Path) -> int:
    state = stages.load_state(state_path)
    return int(state["step"]) if state else 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-base", help="train a small SD-format base model from scratch on good images",
                       description=__doc__.splitlines()[0])
    p.add_argument("data", help="training shards (`defect-ds prepare`); only its good images are used")
    p.add_argument("out", help="output folder: a diffusers Stable Diffusion folder when done")
    add_config_argument(p, "[recipe] of defect_ds.pretrain.recipe.BaseRecipe, [run] of RunOptions")
    p.add_argument("--recipe", help="recipe JSON (fields of defect_ds.pretrain.recipe.BaseRecipe; a finished "
                   "base's recipe.json does), read after --config")
    add_alias(p, "--seed", "recipe.seed", type=int)
    add_alias(p, "--vae-steps", "recipe.vae_steps", type=int)
    add_alias(p, "--unet-steps", "recipe.unet_steps", type=int)
    add_alias(p, "--vae-batch-size", "recipe.vae_batch_size", type=int)
    add_alias(p, "--unet-batch-size", "recipe.unet_batch_size", type=int)
    add_alias(p, "--resolution-px", "run.resolution_px", type=int,
              help="resize images to this side (default: as stored)")
    add_alias(p, "--precision", "recipe.precision", choices=("auto", "bf16", "fp32"),
              help="autocast of the forward passes (default: the recipe's, auto: bf16 on CPUs with avx512_bf16 "
                   "or AMX, else fp32)")
    add_alias(p, "--threads", "run.threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_alias(p, "--fp32", "run.save_fp16", action="store_const", const=False,
              help="save the UNet and VAE in fp32 (default: fp16, half the size; the text encoder is always fp32)")
    add_alias(p, "--sample-steps", "run.sample_steps", type=int,
              help="denoising steps of the sample grid (default: 30)")
    add_alias(p, "--vae-from", "run.vae_from",
              help="reuse a finished base's codec (its vae/) instead of training one: a UNet change compared on the "
                   "same latents")
    add_alias(p, "--keep-state", "run.keep_state", action="store_const", const=True,
              help="keep OUT/train_state/ after finishing")
    add_alias(p, "--no-progress", "run.progress", action="store_const", const=False)
    p.set_defaults(func=run)
