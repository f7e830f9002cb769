"""`defect-ds generate`: new defect images with exact masks, from a trained run or its exports.

    defect-ds generate work/gen --run runs/default --num-per-type 8
    defect-ds generate work/inpaint --run runs/default --mode inpaint --sources work/data --masks procedural

The settings and the planning of samples are in `spec.py`, the pipeline in `pipeline.py`, reading
inputs in `data/reader.py`, writing samples, shards and the resume check in `output.py`.
A run that stops can be started again with the same flags: finished samples are skipped and each
sample's seed depends only on its key.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from defect_ds.data.masks import KINDS
from defect_ds.data.mvtec import write_mvtec
from defect_ds.data.reader import load_mask_pool, load_sources
from defect_ds.evaluate.report import save_sample_grid
from defect_ds.generate.mask_model import load_mask_model
from defect_ds.generate.output import check_resume, sample_done, write_sample, write_shards
from defect_ds.generate.pipeline import build_pipeline, generate_batch, planned_resolution
from defect_ds.generate.spec import DEFAULT_PROMPT, MASK_SOURCES, MODES, GenerationSettings, plan_samples
from defect_ds.model.sampling import SCHEDULERS, set_scheduler
from defect_ds.utils.device import resolve_device, resolve_dtype
from defect_ds.utils.quiet import quiet_libraries

# ---- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    resolution = args.resolution_px or planned_resolution(run=args.run, base_model=args.base_model)
    # every mask and source file is decoded before the pipeline loads: a bad one stops the call in seconds
    # with one sentence naming it, or, with --skip-bad, is left out and counted
    skipped: list[str] | None = [] if args.skip_bad else None
    pool = load_mask_pool(args.masks, args.mask_dir or args.data, resolution, skipped)
    sources = load_sources(args.sources, resolution, skipped) if args.mode == "inpaint" else []
    if skipped:
        print(f"generate: skipped {len(skipped)} unreadable input file(s) (first: {skipped[0]})")
    words = parse_words(args.words)
    pipe, tokens, info = build_pipeline(run=args.run, base_model=args.base_model, lora=args.lora,
                                        embeddings=args.embeddings, device=device, dtype=dtype,
                                        mask_gating=not args.no_mask_gating, mask_resize=args.mask_resize,
                                        base_only=bool(words))
    tokens = words or tokens
    if not tokens:
        raise ValueError("The export has no learned tokens; pass --embeddings, --words TYPE=WORD,... or train "
                         "with textual inversion.")
    defect_types = args.defect_types.split(",") if args.defect_types else sorted(tokens)
    unknown = [t for t in defect_types if t not in tokens]
    if unknown:
        raise ValueError(f"--defect-types names {unknown[0]!r}, which the export has no token for; "
                         f"known: {', '.join(sorted(tokens))}.")
    settings = GenerationSettings(
        mode=args.mode, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
        strength=args.strength, resolution_px=int(resolution), prompt=args.prompt,
        negative_prompt=args.negative_prompt, category=args.category, seed=args.seed, mask_source=args.masks,
        mask_kind=args.mask_kind, mask_size=tuple(args.mask_size),
        mask_data=str(Path(args.data).resolve()) if args.data else "",
        mask_model=str(Path(args.mask_model).resolve()) if args.mask_model else "",
        precision="bf16" if dtype == torch.bfloat16 else "fp32", export=info["export"],
        export_step=info["export_step"], base_model=info["base_model"], lora=info["lora"],
        embeddings=info["embeddings"], mask_gating=info["mask_gating"], mask_resize=info["mask_resize"],
        inpaint_mask=args.inpaint_mask)
    # every input is read and every sample planned before the folder is touched: a call that fails
    # here leaves nothing behind that a corrected call would have to match
    sampler = None
    if settings.mask_source == "learned":
        sampler = load_mask_model(args.mask_model, settings.resolution_px, defect_types).sample
    specs = plan_samples(tokens, defect_types, args.num_per_type, settings, mask_pool=pool, sources=sources,
                         loose_weights=not args.run, mask_sampler=sampler)
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
    if args.layout == "mvtec":  # rewritten whole, like shards/, from every finished sample
        write_mvtec(out_dir, out_dir / "mvtec", category=args.category, overwrite=True)
        print(f"wrote the MVTec AD tree {out_dir / 'mvtec'}")
    return 0


def parse_words(text: str | None) -> dict[str, str]:
    """--words "crack=crack,scratch=scratch" -> {defect type: the plain word its prompts use}."""
    words = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, word = item.partition("=")
        if not sep or not name.strip() or not word.strip():
            raise ValueError(f"--words {item!r} is invalid: write --words TYPE=WORD[,TYPE=WORD...].")
        words[name.strip()] = word.strip()
    return words


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
    src.add_argument("--words", help="prompt defect types by plain words instead of learned tokens, e.g. "
                     "crack=crack,scratch=scratch; with --base-model alone, the base model without a fine-tune")
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
    what.add_argument("--skip-bad", action="store_true", help="skip truncated or corrupt source and mask files "
                      "and count them instead of stopping at the first")
    masks = p.add_argument_group("masks")
    masks.add_argument("--masks", choices=MASK_SOURCES, default="procedural")
    masks.add_argument("--mask-dir", help="--masks files: folder of mask PNGs (subfolders per defect type)")
    masks.add_argument("--data", help="--masks dataset or augmented: the few shots (shards folder) whose masks "
                       "to reuse or augment, per defect type")
    masks.add_argument("--mask-model", help="--masks learned: a mask model folder (`defect-ds train-masks`)")
    masks.add_argument("--mask-kind", choices=KINDS, default="mixed", help="procedural masks: shape")
    masks.add_argument("--mask-size", type=float, nargs=2, default=[0.15, 0.4], metavar=("MIN", "MAX"),
                       help="procedural masks: extent as a fraction of the object's size")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    sampling.add_argument("--steps", type=int, default=30)
    sampling.add_argument("--guidance-scale", type=float, default=7.5)
    sampling.add_argument("--inpaint-mask", choices=("cells", "nearest"), default="cells",
                          help="inpaint: free every latent cell the mask touches (cells), or let diffusers shrink "
                               "the mask by nearest sampling")
    sampling.add_argument("--strength", type=float, default=1.0, help="inpaint: noise level of the mask region")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--resolution-px", type=int, default=0, help="default: the export's resolution")
    sampling.add_argument("--batch-size", type=int, default=4)
    sampling.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    sampling.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                          help="auto: bf16 on a GPU and on a CPU with native bf16 (avx512_bf16, AMX), else fp32")
    out = p.add_argument_group("output")
    out.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    out.add_argument("--layout", choices=("shards", "mvtec"), default="shards",
                     help="mvtec: also write OUT_DIR/mvtec/, the MVTec AD tree (as `defect-ds export mvtec`)")
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
    needs = {"mask_dir": (("files",), "--mask-dir DIR (a folder of mask PNGs)"),
             "data": (("dataset", "augmented"), "--data DIR (a data set whose defect masks to use)"),
             "mask_model": (("learned",), "--mask-model DIR (made by `defect-ds train-masks`)")}
    for attr, (kinds, flag) in needs.items():
        given = getattr(args, attr)
        if args.masks in kinds and not given:
            raise ValueError(f"--masks {args.masks} needs {flag}; add it or use --masks procedural.")
        if given and args.masks not in kinds:  # else the folder would be silently ignored
            raise ValueError(f"--{attr.replace('_', '-')} is only read with --masks {' or '.join(kinds)}; add "
                             f"--masks {kinds[0]} or drop the flag.")
    if args.mode == "inpaint" and not args.sources:
        raise ValueError("--mode inpaint needs --sources DIR (good images, or a data set's good samples).")
    if args.sources and args.mode != "inpaint":
        raise ValueError("--sources is only read with --mode inpaint; add --mode inpaint or drop --sources.")
    with quiet_libraries():
        return run(args)
