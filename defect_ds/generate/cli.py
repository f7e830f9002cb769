"""`defect-ds generate`: new defect images with exact masks, from a trained run or its exports.

    defect-ds generate work/gen --run runs/default --num-per-type 8
    defect-ds generate work/inpaint --run runs/default --mode inpaint --sources work/data --masks procedural
    defect-ds generate work/gen --run runs/default --sampling.steps=20 --masks.kind=blob
    defect-ds generate work/inpaint --run runs/default --mode inpaint --sources work/data --masks augmented \
        --data work/downstream/shots --keep-recognisable

Settings are `GenerateConfig`'s sections (`--config FILE.toml`, `--section.field=value`, each flag an
alias of one field); the settings and the planning of samples are in `spec.py`, the pipeline in
`pipeline.py`, reading inputs in `data/reader.py`, writing samples, shards and the resume check in
`output.py`, the optional filter of unrecognisable pairs in `filter.py`. A run that stops can be started
again with the same settings: finished samples are skipped and each sample's seed depends only on its key.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from defect_ds.config import add_alias, add_config_argument, alias_values, load_config
from defect_ds.data.masks import KINDS
from defect_ds.data.mvtec import write_mvtec
from defect_ds.data.reader import UnreadableInputError, load_mask_pool, load_sources
from defect_ds.evaluate.report import save_sample_grid
from defect_ds.generate import filter as quality_filter
from defect_ds.generate.mask_model import load_mask_model
from defect_ds.generate.output import check_resume, sample_done, write_sample, write_shards
from defect_ds.generate.pipeline import build_pipeline, generate_batch, planned_resolution
from defect_ds.generate.spec import (DEFAULT_PROMPT, MASK_SOURCES, MODES, GenerateConfig, GenerationSettings,
                                     plan_samples)
from defect_ds.model.sampling import SCHEDULERS, set_scheduler
from defect_ds.utils.device import resolve_device, resolve_dtype
from defect_ds.utils.quiet import quiet_libraries

# ---- the command -----------------------------------------------------------------------------

def run(out_dir: Path, cfg: GenerateConfig) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    weights, what, masks, sampling = cfg.weights, cfg.samples, cfg.masks, cfg.sampling
    device = resolve_device(sampling.device)
    dtype = resolve_dtype(sampling.precision, device)
    resolution = sampling.resolution_px or planned_resolution(run=weights.run, base_model=weights.base_model)
    # every mask and source file is decoded before the pipeline loads: a bad one stops the call in seconds
    # with one sentence naming it, or, with samples.skip_bad, is left out and counted
    skipped: list[str] | None = [] if what.skip_bad else None
    try:
        pool = load_mask_pool(masks.source, masks.dir or masks.data, resolution, skipped)
        sources = load_sources(what.sources, resolution, skipped) if what.mode == "inpaint" else []
    except UnreadableInputError as e:
        raise UnreadableInputError(f"{e} (pass --skip-bad to skip bad inputs and count them)") from None
    if skipped:
        print(f"generate: skipped {len(skipped)} unreadable input file(s) (first: {skipped[0]})")
    judge_settings = judge = None
    if cfg.quality.keep_recognisable:  # trained before the pipeline loads: bad shots stop the call here
        data = cfg.quality.judge_data or masks.data  # one of them is set (GenerateConfig.validate)
        judge_settings = quality_filter.JudgeSettings(str(Path(data).resolve()), steps=cfg.quality.judge_steps,
                                                      threshold=cfg.quality.threshold, seed=sampling.seed)
        with Progress(TextColumn("judge"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not cfg.output.progress) as progress:
            task = progress.add_task("judge", total=judge_settings.steps)
            print(f"generate: training the judge of --keep-recognisable on {data} ({judge_settings.steps} steps)")
            judge = quality_filter.train_judge(judge_settings, int(resolution),
                                               on_step=lambda _step: progress.advance(task))
    words = {name.strip(): word.strip() for name, _, word in (w.partition("=") for w in weights.words)}
    pipe, tokens, info = build_pipeline(run=weights.run, base_model=weights.base_model, lora=weights.lora,
                                        embeddings=weights.embeddings, device=device, dtype=dtype,
                                        mask_gating=weights.mask_gating, mask_resize=weights.mask_resize or None,
                                        base_only=bool(words))
    tokens = words or tokens
    if not tokens:
        raise ValueError("The export has no learned tokens; pass --embeddings, --words TYPE=WORD,... or train "
                         "with textual inversion.")
    defect_types = what.defect_types or sorted(tokens)
    unknown = [t for t in defect_types if t not in tokens]
    if unknown:
        raise ValueError(f"--defect-types names {unknown[0]!r}, which the export has no token for; "
                         f"known: {', '.join(sorted(tokens))}.")
    settings = GenerationSettings(
        mode=what.mode, scheduler=sampling.scheduler, steps=sampling.steps, guidance_scale=sampling.guidance_scale,
        strength=sampling.strength, resolution_px=int(resolution), prompt=what.prompt,
        negative_prompt=what.negative_prompt, category=what.category, seed=sampling.seed, mask_source=masks.source,
        mask_kind=masks.kind, mask_size=tuple(masks.size),
        mask_data=str(Path(masks.data).resolve()) if masks.data else "",
        mask_model=str(Path(masks.model).resolve()) if masks.model else "",
        precision="bf16" if dtype == torch.bfloat16 else "fp32", export=info["export"],
        export_step=info["export_step"], base_model=info["base_model"], lora=info["lora"],
        embeddings=info["embeddings"], mask_gating=info["mask_gating"], mask_resize=info["mask_resize"],
        inpaint_mask=sampling.inpaint_mask)
    # every input is read and every sample planned before the folder is touched: a call that fails
    # here leaves nothing behind that a corrected call would have to match
    sampler = None
    if settings.mask_source == "learned":
        sampler = load_mask_model(masks.model, settings.resolution_px, defect_types).sample
    specs = plan_samples(tokens, defect_types, what.num_per_type, settings, mask_pool=pool, sources=sources,
                         loose_weights=not weights.run, mask_sampler=sampler)
    out_dir = Path(out_dir)
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
                  disable=not cfg.output.progress) as progress:
        task = progress.add_task("generate", total=len(todo))
        for start in range(0, len(todo), sampling.batch_size):
            batch = todo[start:start + sampling.batch_size]
            for spec, (image, raw) in zip(batch, generate_batch(pipe, batch, settings, inpaint_pipe)):
                write_sample(out_dir, spec, image, settings, raw if spec.source is not None else None)
            progress.advance(task, len(batch))
    extra, kept = {"generation": asdict(settings)}, ""
    if judge is not None:
        report = quality_filter.judge_samples(out_dir, judge, judge_settings, settings.resolution_px)
        print(quality_filter.summary(report))
        n_kept = sum(s["kept"] for s in report["samples"].values())
        if not n_kept:
            raise ValueError(f"The judge found no defect inside the mask of any of the {len(report['samples'])} "
                             f"pairs, so nothing was moved and shards/ not rewritten; their scores are in "
                             f"{out_dir / quality_filter.REPORT_FILE}.")
        quality_filter.apply(out_dir, report)
        extra["recognisability_filter"] = {"judge": report["judge"], "per_type": report["per_type"]}
        kept = f" ({n_kept} kept, {len(report['samples']) - n_kept} moved to {out_dir / 'dropped'})"
    shards = write_shards(out_dir, tokens, cfg.output.shard_size, extra=extra)
    grid = save_sample_grid(out_dir / "samples", out_dir / "grid.png")
    print(f"wrote {len(specs)} samples to {out_dir / 'samples'}{kept}, {len(shards)} shard(s) to {out_dir / 'shards'}, "
          f"grid {grid}")
    if cfg.output.layout == "mvtec":  # rewritten whole, like shards/, from every finished sample
        write_mvtec(out_dir, out_dir / "mvtec", category=what.category, overwrite=True)
        print(f"wrote the MVTec AD tree {out_dir / 'mvtec'}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate defect images with exact masks from a trained export",
                       description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="output folder (samples/, shards/, grid.png); resumed if it exists")
    add_config_argument(p, "[weights], [samples], [masks], [sampling], [output] of defect_ds.generate.spec")
    src = p.add_argument_group("weights")
    add_alias(src, "--run", "weights.run", help="run directory or export folder (export.json names the base model)")
    add_alias(src, "--base-model", "weights.base_model",
              help="diffusers SD folder (default: the one export.json names)")
    add_alias(src, "--lora", "weights.lora", help="without --run: pytorch_lora_weights.safetensors (file or folder)")
    add_alias(src, "--embeddings", "weights.embeddings", nargs="+", help="without --run: "
              "learned_embeds/<token>.safetensors files or their folder; TYPE=FILE names the defect type, else the "
              "export.json beside them does, else the token minus its sks_ prefix")
    add_alias(src, "--no-mask-gating", "weights.mask_gating", action="store_const", const=False,
              help="let the LoRA act on the whole image")
    add_alias(src, "--mask-resize", "weights.mask_resize", choices=("nearest", "max"),
              help="how the gate resizes masks (default: as trained, else nearest)")
    add_alias(src, "--words", "weights.words", help="prompt defect types by plain words instead of learned tokens, "
              "e.g. crack=crack,scratch=scratch; with --base-model alone, the base model without a fine-tune")
    what = p.add_argument_group("what to generate")
    add_alias(what, "--mode", "samples.mode", choices=MODES, help="default: text2img")
    add_alias(what, "--defect-types", "samples.defect_types",
              help="comma-separated defect types (default: every learned token)")
    add_alias(what, "--num-per-type", "samples.num_per_type", type=int, help="samples per defect type (default: 8)")
    add_alias(what, "--prompt", "samples.prompt", help="prompt template with {token}, {defect_type}, {category} "
              f"(default: the training captions' form, {DEFAULT_PROMPT!r})")
    add_alias(what, "--negative-prompt", "samples.negative_prompt")
    add_alias(what, "--category", "samples.category", help="object category for {category} and metadata "
              "(data-set masks and sources bring their own; default: object)")
    add_alias(what, "--sources", "samples.sources",
              help="inpaint: folder of good images, or a data set (its 'good' samples)")
    add_alias(what, "--skip-bad", "samples.skip_bad", action="store_const", const=True, help="skip truncated or "
              "corrupt source and mask files and count them instead of stopping at the first")
    masks = p.add_argument_group("masks")
    add_alias(masks, "--masks", "masks.source", choices=MASK_SOURCES, help="default: procedural")
    add_alias(masks, "--mask-dir", "masks.dir", help="--masks files: folder of mask PNGs (subfolders per defect type)")
    add_alias(masks, "--data", "masks.data", help="--masks dataset or augmented: the few shots (shards folder) "
              "whose masks to reuse or augment, per defect type")
    add_alias(masks, "--mask-model", "masks.model", help="--masks learned: a mask model folder "
              "(`defect-ds train-masks`)")
    add_alias(masks, "--mask-kind", "masks.kind", choices=KINDS, help="procedural masks: shape (default: mixed)")
    add_alias(masks, "--mask-size", "masks.size", type=float, nargs=2, metavar=("MIN", "MAX"),
              help="procedural masks: extent as a fraction of the object's size (default: 0.15 0.4)")
    sampling = p.add_argument_group("sampling")
    add_alias(sampling, "--scheduler", "sampling.scheduler", choices=SCHEDULERS, help="default: ddim")
    add_alias(sampling, "--steps", "sampling.steps", type=int, help="default: 30")
    add_alias(sampling, "--guidance-scale", "sampling.guidance_scale", type=float, help="default: 7.5")
    add_alias(sampling, "--inpaint-mask", "sampling.inpaint_mask", choices=("cells", "nearest"),
              help="inpaint: free every latent cell the mask touches (cells, the default), or let diffusers "
                   "shrink the mask by nearest sampling")
    add_alias(sampling, "--strength", "sampling.strength", type=float,
              help="inpaint: noise level of the mask region (default: 1)")
    add_alias(sampling, "--seed", "sampling.seed", type=int, help="default: 0")
    add_alias(sampling, "--resolution-px", "sampling.resolution_px", type=int, help="default: the export's resolution")
    add_alias(sampling, "--batch-size", "sampling.batch_size", type=int, help="default: 4")
    add_alias(sampling, "--device", "sampling.device", help="auto (default), cpu, cuda, cuda:1, ...")
    add_alias(sampling, "--precision", "sampling.precision", choices=("auto", "bf16", "fp32"),
              help="auto (default): bf16 on a GPU and on a CPU with native bf16 (avx512_bf16, AMX), else fp32")
    out = p.add_argument_group("output")
    add_alias(out, "--shard-size", "output.shard_size", type=int,
              help="samples per WebDataset shard (default: 1000)")
    add_alias(out, "--layout", "output.layout", choices=("shards", "mvtec"),
              help="mvtec: also write OUT_DIR/mvtec/, the MVTec AD tree (as `defect-ds export mvtec`)")
    add_alias(out, "--no-progress", "output.progress", action="store_const", const=False, help="no progress bar")
    quality = p.add_argument_group("quality filter")
    add_alias(quality, "--keep-recognisable", "quality.keep_recognisable", action="store_const", const=True,
              help="keep only the pairs whose defect a segmenter trained on the shots finds inside the mask; "
                   "the rest move to OUT_DIR/dropped/ (scores in recognisability.json)")
    add_alias(quality, "--judge-data", "quality.judge_data", help="the shots the judge trains on (default: --data)")
    add_alias(quality, "--judge-steps", "quality.judge_steps", type=int, help="the judge's training steps (default: 900)")
    add_alias(quality, "--judge-threshold", "quality.threshold", type=float,
              help="found: the judge's highest probability inside the mask reaches this (default: 0.5)")
    p.set_defaults(func=_checked_run)


def _checked_run(args: argparse.Namespace) -> int:
    """Settings are read and checked with no model loaded: a bad call stops here, in a second, before anything
    is written."""
    cfg = load_config(args.config, args.overrides, GenerateConfig(), [alias_values(args)])
    with quiet_libraries():
        return run(Path(args.out_dir), cfg)
