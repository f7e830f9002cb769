"""One training step in one process under several settings, interleaved, to choose the CPU defaults.

    python benchmarks/bench_step.py --model work/tiny-sd --resolution-px 64 --batch 8 \
        --variant fp32:train.precision=fp32 --variant bf16:train.precision=bf16

Each variant is NAME:SECTION.FIELD=VALUE[,SECTION.FIELD=VALUE...] on top of the run config. Every
variant's model is built once; then rounds run the variants in turn (A B C A B C ...), each round
timing `--steps` steps (loss, backward, AdamW) of a random batch after `--warmup-steps`. On a
loaded machine absolute times drift, so the figure to read is each variant's median step time
relative to the first variant within the same round. `--latents` feeds every variant stored latents and
text embeddings (what `defect-ds prepare latents --text-embeddings` writes), so the step is the UNet's
alone and its FLOPs leave out the VAE and the text encoder. Results go to
benchmarks/results/step-DATE-NAME.md with the device, versions, load and resolved settings.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

from defect_ds.config import load_config
from defect_ds.model.defect_model import build_model
from defect_ds.perf.cpu_peak import cpu_peaks
from defect_ds.perf.flops import measure_flops
from defect_ds.perf.sweep import cpu_name
from defect_ds.utils.device import resolve_dtype
from defect_ds.utils.memory import retain_freed_memory

CAPTIONS = ["a photo of a pill with a scratch", "a photo of a screw with a crack", "a photo of a tile"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, settings = text.partition(":")
    return name, [f"--{s.strip()}" for s in settings.split(",") if s.strip()]


def random_batch(batch: int, resolution: int, generator: torch.Generator) -> dict:
    mask = torch.zeros(batch, 1, resolution, resolution)
    for i in range(batch):  # one rectangle a quarter of the side, somewhere
        y, x = (torch.randint(0, resolution * 3 // 4, (2,), generator=generator)).tolist()
        mask[i, :, y:y + resolution // 4, x:x + resolution // 4] = 1
    return {"pixel_values": torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1,
            "mask": mask, "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]}


@torch.no_grad()
def stored_latents(model, batch: dict) -> dict:
    """The batch as latent shards give it: unscaled VAE posterior mean and the text encoder's output."""
    latents = model.vae.encode(batch["pixel_values"].to(model.compute_dtype)).latent_dist.mean.float()
    text = model.text_encoder(model.token_ids(batch["caption"]))[0].float()
    return {"latents": latents, "text_embeds": text, "mask": batch["mask"], "caption": batch["caption"]}


class Runner:
    """One variant: its model, optimizer and the function that runs a step."""

    def __init__(self, config: str | None, overrides: list[str]):
        self.cfg = cfg = load_config(config, overrides)
        torch.manual_seed(cfg.train.seed)
        self.dtype = resolve_dtype(cfg.train.precision, torch.device("cpu"))
        self.model = build_model(cfg.model, cfg.lora, cfg.textual_inversion, cfg.loss, tokens=[],
                                 compute_dtype=self.dtype)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optimizer.learning_rate)
        self.denoise = torch.compile(self.model) if cfg.model.compile else self.model
        self.step_index = 0

    def step(self, batch: dict) -> None:
        generator = torch.Generator().manual_seed(self.step_index)
        self.step_index += 1
        loss = self.model.loss(batch, generator, denoise=self.denoise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="diffusers model folder (make-tiny-model DIR [--arch sd15])")
    p.add_argument("--config", help="run config the variants start from (default: the built-in defaults)")
    p.add_argument("--resolution-px", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variant", action="append", required=True, metavar="NAME:SECTION.FIELD=VALUE,...")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before the first round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--latents", action="store_true",
                   help="steps on stored latents and text embeddings (no VAE, no text encoder per step)")
    p.add_argument("--out", help="markdown results file (default benchmarks/results/step-DATE-NAMES.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the trainer does on the CPU
    common = [f"--model.pretrained_dir={args.model}", f"--data.resolution_px={args.resolution_px}",
              f"--train.micro_batch_size={args.batch}", "--textual_inversion.enabled=false"]
    variants = [parse_variant(v) for v in args.variant]
    load_before = os.getloadavg()
    runners = {name: Runner(args.config, common + overrides) for name, overrides in variants}
    batch = random_batch(args.batch, args.resolution_px, torch.Generator().manual_seed(0))
    if args.latents:
        batch = stored_latents(next(iter(runners.values())).model, batch)
    for runner in runners.values():
        for _ in range(args.warmup_steps):
            runner.step(batch)
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, runner in runners.items():
            steps = []
            for _ in range(args.steps):
                start = time.perf_counter()
                runner.step(batch)
                steps.append(time.perf_counter() - start)
            times[name].append(steps)
            print(f"round {r} {name}: median {statistics.median(steps):.4f} s/step", flush=True)
    base = next(iter(runners))
    cfg = runners[base].cfg
    flops = measure_flops(dict(runners[base].model.unet.config), dict(runners[base].model.vae.config),
                          runners[base].model.text_encoder.config, resolution_px=args.resolution_px,
                          unet_mode=cfg.model.unet_mode, lora_rank=cfg.lora.rank,
                          lora_targets=list(cfg.lora.target_modules),
                          activation_checkpointing=cfg.model.activation_checkpointing,
                          latents_precomputed=args.latents, text_embeddings_precomputed=args.latents)
    peaks = cpu_peaks(threads=args.threads)
    lines = [f"# Training step, one process, {datetime.date.today()}", "",
             f"`python benchmarks/bench_step.py {' '.join(argv or __import__('sys').argv[1:])}`", "",
             f"- device: {cpu_name()}, {args.threads} thread(s); load average 1/5/15 min before "
             f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after "
             f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}",
             "- versions: " + ", ".join(f"{lib} {metadata.version(lib)}" for lib in
                                        ("torch", "diffusers", "peft", "transformers")),
             f"- model {args.model}, {args.resolution_px} px, batch {args.batch}, {args.rounds} rounds x "
             f"{args.steps} steps after {args.warmup_steps} warm-up steps"
             f"{' on stored latents and text embeddings' if args.latents else ''}; model GFLOP per image "
             f"{flops.model_flops / 1e9:.2f}",
             f"- measured matmul peak: fp32 {peaks['fp32'] * 1e3:.0f} GFLOP/s, bf16 {peaks['bf16'] * 1e3:.0f} GFLOP/s",
             "", "| variant | settings | median s/step | images/s | vs first (per-round medians) | % of peak |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, overrides in variants:
        per_round = [statistics.median(s) for s in times[name]]
        ratios = [b / t for b, t in zip((statistics.median(s) for s in times[base]), per_round)]
        median = statistics.median(per_round)
        precision = "bf16" if runners[name].dtype == torch.bfloat16 else "fp32"
        pct = flops.model_flops * args.batch / median / 1e12 / peaks[precision]
        lines.append(f"| {name} | `{' '.join(overrides) or '(defaults)'}` | {median:.4f} | "
                     f"{args.batch / median:.1f} | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {100 * pct:.0f}% ({precision}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or f"benchmarks/results/step-{datetime.date.today()}-{'-'.join(runners)}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
