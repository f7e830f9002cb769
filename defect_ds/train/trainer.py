"""The training loop: masked LoRA and textual inversion on a DeepSpeed engine.

    deepspeed --num_gpus 2 train.py --config configs/default.toml
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from defect_ds.train import checkpoint as ckpt
from defect_ds.model import objective as diffusion
from defect_ds.config import RunConfig, save_config
from defect_ds.train.distributed import DistInfo, build_ds_config, uses_offload, zero_stage
from defect_ds.model.mask_gating import enable_mask_gating, set_mask
from defect_ds.model.components import add_lora, load_components, set_trainable
from defect_ds.train.logger import make_logger
from defect_ds.model.textual_inversion import add_tokens, expand_prompt


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class DefectDiffusionModel(nn.Module):
    """What the engine wraps: the UNet (with LoRA) and the text encoder (with learned tokens)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, mask_gating: bool,
                 autocast_dtype: torch.dtype | None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.mask_gating = mask_gating
        self.autocast_dtype = autocast_dtype
        self.text_trains = any(p.requires_grad for p in text_encoder.parameters())

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor,
                mask: torch.Tensor, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """text_embeds: precomputed encoder states (latent shards, frozen text encoder) skip the encoder."""
        device_type = noisy_latents.device.type
        autocast = (torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            if text_embeds is not None and not self.text_trains:
                text = text_embeds
            else:
                with torch.set_grad_enabled(self.text_trains and torch.is_grad_enabled()):
                    text = self.text_encoder(input_ids)[0]
            if self.mask_gating:
                # stays set through backward: checkpointed blocks recompute with the same mask
                set_mask(self.unet, mask)
            return self.unet(noisy_latents, timesteps, text).sample


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Interval:
    """Counters between two log steps; the loss stays on the device until it is logged."""

    def __init__(self, device: torch.device, nonfinite: torch.Tensor | None = None):
        self.start = time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = nonfinite if nonfinite is not None else torch.zeros((), device=device, dtype=torch.bool)
        self.micro_steps = self.steps = self.samples = 0
        self.data_wait_s = 0.0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)
        self.micro_steps += 1
        self.samples += samples


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo):
        self.cfg = cfg
        self.dist = dist_info
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0  # optimizer steps done
        self.micro_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.data_counts = [0, 0]  # this rank's bad samples replaced, samples padded, over the run

    # ---- building -------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed

        from defect_ds.data import read_manifest

        cfg, device = self.cfg, self.dist.device
        self.ds_config = build_ds_config(cfg.train.ds_config, cfg.train, cfg.optimizer, self.dist.world_size)
        self.manifest = read_manifest(cfg.data.train_shards)
        self.defect_tokens: dict[str, str] = dict(self.manifest.get("defect_tokens", {}))
        self.tokens = list(self.defect_tokens.values()) if cfg.textual_inversion.enabled else []
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.json")
        dist.barrier()
        self.log = make_logger(cfg.logging, self.run_dir, self.dist.is_main)

        torch.manual_seed(cfg.train.seed)  # identical new-layer weights on every rank
        parts = load_components(cfg.model)
        self.vae, self.tokenizer, self.noise_scheduler = parts.vae, parts.tokenizer, parts.noise_scheduler
        unet, text_encoder = parts.unet, parts.text_encoder
        if cfg.model.unet_mode == "lora":
            add_lora(unet, cfg.lora)
        if self.tokens:
            add_tokens(self.tokenizer, text_encoder, self.tokens, cfg.textual_inversion.vectors_per_token,
                       cfg.textual_inversion.initializer_word)
        set_trainable(unet, text_encoder, cfg.model.unet_mode)
        if cfg.model.activation_checkpointing:
            unet.enable_gradient_checkpointing()
        self.dtype = compute_dtype(cfg.train.precision, device)
        for module in (unet, text_encoder, self.vae):  # frozen weights in the compute dtype
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.dtype)
        if cfg.model.channels_last:
            unet.to(memory_format=torch.channels_last)
        self.vae.to(device).eval()
        mask_gating = cfg.model.unet_mode == "lora" and cfg.lora.mask_gating
        if mask_gating:
            enable_mask_gating(unet, cfg.lora.mask_resize)
        model = DefectDiffusionModel(unet, text_encoder, mask_gating,
                                     self.dtype if self.dtype != torch.float32 else None)
        optimizer = self._optimizer([p for p in unet.parameters() if p.requires_grad],
                                    [p for p in text_encoder.parameters() if p.requires_grad], device)
        schedule = self._schedule(optimizer)
        self.engine, _, _, self.lr_schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config)
        if cfg.model.compile:
            self.engine.compile()
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.prediction_type = (self.noise_scheduler.config.prediction_type
                                if cfg.loss.prediction_type == "scheduler" else cfg.loss.prediction_type)
        self._maybe_resume()
        self._setup_meter()

    def _optimizer(self, unet_params: list[nn.Parameter], text_params: list[nn.Parameter],
                   device: torch.device) -> torch.optim.Optimizer:
        cfg = self.cfg.optimizer
        groups = []
        if unet_params:
            groups.append({"params": unet_params, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay})
        if text_params:  # no decay: it would pull the token vectors towards zero
            groups.append({"params": text_params, "lr": self.cfg.textual_inversion.learning_rate,
                           "weight_decay": 0.0})
        kwargs = dict(betas=tuple(cfg.betas), eps=cfg.eps)
        if uses_offload(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)

    def _schedule(self, optimizer: torch.optim.Optimizer):
        from diffusers.optimization import get_scheduler

        cfg = self.cfg.optimizer
        name = "cosine" if cfg.schedule == "cosine" else "constant_with_warmup"
        return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=self.cfg.train.max_steps)

    def _from_rank0(self, value):
        """Rank 0's value on every rank. Decisions read from files (resume, skip a save, skip a sample
        grid) must agree: a rank that saw the files differently, mid-write or on a slow network
        filesystem, would take another branch and wait forever in a collective."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _maybe_resume(self) -> None:
        try:
            found = (ckpt.find_resume_tag(self.ckpt_dir, self.cfg.checkpoint.resume), None)
        except FileNotFoundError as e:
            found = (None, str(e))
        tag, error = self._from_rank0(found)
        if error:
            raise FileNotFoundError(error)
        if tag is None:
            if self.cfg.checkpoint.resume:
                self.log.info("checkpoint.resume=latest: no committed checkpoint yet, starting fresh")
            return
        state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
        self.step, self.micro_step = state["step"], state["micro_step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.data_counts = list(state.get("data_counts", [0, 0]))
        ckpt.set_rng_state(state["rng"])
        self.log.info(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    def _setup_meter(self) -> None:
        self.meter = None
        try:
            from defect_ds.perf.mfu import make_meter
        except ImportError:
            return
        self.meter = make_meter(self.cfg, self.vae, self.engine.module, self.dist, self.manifest)

    # ---- one step -------------------------------------------------------------------------------
    def forward_backward(self, batch: dict) -> torch.Tensor:
        cfg, device = self.cfg, self.dist.device
        gen = torch.Generator(device).manual_seed(
            (cfg.train.seed * 1_000_003 + self.micro_step) * self.dist.world_size + self.dist.rank)
        torch.manual_seed(gen.initial_seed())  # LoRA dropout, identical on an exact resume
        mask = batch["mask"].to(device, non_blocking=True)
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(device, non_blocking=True) * self.vae.config.scaling_factor
            else:
                pixels = batch["pixel_values"].to(device, self.dtype, non_blocking=True)
                dist_ = self.vae.encode(pixels).latent_dist
                latents = dist_.sample(generator=gen).float() * self.vae.config.scaling_factor
        latents = latents.float()
        noise = diffusion.sample_noise(latents, cfg.loss.noise_offset, gen)
        timesteps = diffusion.sample_timesteps(latents.shape[0], len(self.alphas_cumprod), gen, device)
        noisy = diffusion.add_noise(latents, noise, timesteps, self.alphas_cumprod)
        target = diffusion.prediction_target(self.prediction_type, latents, noise, timesteps,
                                             self.alphas_cumprod)
        input_ids = self._token_ids(batch["caption"]).to(device)
        if cfg.model.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        text_embeds = batch.get("text_embeds")
        if text_embeds is not None:
            text_embeds = text_embeds.to(device, non_blocking=True)
        pred = self.engine(noisy, timesteps, input_ids, mask, text_embeds)
        weights = None
        if cfg.loss.min_snr_gamma > 0:
            weights = diffusion.min_snr_weights(timesteps, self.alphas_cumprod, cfg.loss.min_snr_gamma,
                                                self.prediction_type)
        loss = diffusion.masked_diffusion_loss(pred, target, diffusion.latent_mask(mask, latents.shape[-2:]),
                                               cfg.loss, weights)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def _token_ids(self, captions: list[str]) -> torch.Tensor:
        n = self.cfg.textual_inversion.vectors_per_token
        captions = [expand_prompt(c, self.tokens, n) for c in captions]
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        from defect_ds.data.loader import batches_per_epoch, build_loader

        cfg = self.cfg
        per_epoch = batches_per_epoch(cfg.data, micro_batch_size=cfg.train.micro_batch_size,
                                      world_size=self.dist.world_size)
        if per_epoch < 1:
            raise ValueError(f"{cfg.data.train_shards} yields no full batch of {cfg.train.micro_batch_size} "
                             f"per rank; lower train.micro_batch_size or add data.")
        end = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        interval = Interval(self.dist.device)
        profiler = self._profile(None, end)
        self.log.start(cfg.train.max_steps, self.step)
        while self.step < end:
            if self.batch_in_epoch >= per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            loader = build_loader(cfg.data, micro_batch_size=cfg.train.micro_batch_size,
                                  rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.train.seed,
                                  epoch=self.epoch, skip_batches=self.batch_in_epoch)
            counts_before = list(self.data_counts)
            fetch_start = time.perf_counter()
            for batch in loader:
                interval.data_wait_s += time.perf_counter() - fetch_start
                self.data_counts = [counts_before[0] + loader.num_replaced, counts_before[1] + loader.num_padded]
                interval.add(self.forward_backward(batch), len(batch["caption"]))
                self.micro_step += 1
                self.batch_in_epoch += 1
                if self.micro_step % cfg.train.grad_accum_steps == 0:
                    self.step += 1
                    interval.steps += 1
                    self.log.advance(self.step)
                    profiler = self._profile(profiler, end)
                    if self.step % cfg.logging.log_every_steps == 0 or self.step == end:
                        self._log_interval(interval)
                        interval = Interval(self.dist.device, interval.nonfinite)
                    if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                        self.save(interval.nonfinite)
                    if cfg.logging.sample_every_steps and self.step % cfg.logging.sample_every_steps == 0:
                        self.sample_grid()
                    if self.step >= end:
                        break
                fetch_start = time.perf_counter()
        self.save(interval.nonfinite)  # no-op when this step is already checkpointed
        self.export(self.run_dir / "export")
        sampled = self.run_dir / "samples" / f"{ckpt.tag_for(self.step)}.png"
        if cfg.logging.sample_every_steps and not self._from_rank0(sampled.exists()):
            self.sample_grid()
        self.log.close()

    def _profile(self, profiler: torch.profiler.profile | None, end: int) -> torch.profiler.profile | None:
        """Profiles steps profile_at_step .. +profile_steps-1: starts before the first, then writes
        run_dir/profile/trace-rank{rank}.json (chrome://tracing, perfetto) after the last or at `end`."""
        first, count = self.cfg.logging.profile_at_step, self.cfg.logging.profile_steps
        if profiler is None and first and self.step == first - 1 and self.step < end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.dist.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            profiler.start()
        elif profiler is not None and (self.step >= first + count - 1 or self.step >= end):
            profiler.stop()
            out = self.run_dir / "profile" / f"trace-rank{self.dist.rank}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(out))
            self.log.info(f"wrote profiler trace {out} (steps {first}..{self.step})")
            profiler = None
        return profiler

    def _check_finite(self, nonfinite: torch.Tensor, what: str = "loss") -> None:
        flag = nonfinite.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a host sync: only at log and save steps
        if flag.item() > 0:
            done = ckpt.committed_checkpoints(self.ckpt_dir)
            kept = f"the last good checkpoint {done[-1]} is kept" if done else "no checkpoint was written"
            self.log.close()
            raise TrainingDiverged(f"The {what} became NaN or infinite by step {self.step}; {kept}; lower "
                                   "optimizer.learning_rate or check the data, then resume with "
                                   "--checkpoint.resume=latest.")

    def _weights_nonfinite(self) -> torch.Tensor:
        """Whether any trainable weight on this rank is NaN or infinite (the update after the last
        checked loss can still have blown up). Under ZeRO-3 each rank checks its own partition."""
        bad = torch.zeros((), dtype=torch.bool, device=self.dist.device)
        for p in self.engine.module.parameters():
            if p.requires_grad:
                local = p.ds_tensor if hasattr(p, "ds_tensor") else p
                bad |= ~torch.isfinite(local).all()
        return bad

    def _log_interval(self, interval: "Interval") -> None:
        self._check_finite(interval.nonfinite)
        elapsed = time.perf_counter() - interval.start
        loss_sum = interval.loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / self.dist.world_size / max(1, interval.micro_steps)
        lr = self.lr_schedule.get_last_lr()[0]
        samples = interval.samples * self.dist.world_size
        values = {"loss": loss, "lr": lr, "images_per_s": samples / max(elapsed, 1e-9),
                  "step_time_s": elapsed / max(1, interval.steps), "epoch": self.epoch}
        if self.meter is not None:
            values.update(self.meter.report(elapsed=elapsed, samples=samples, data_wait=interval.data_wait_s))
        counts = torch.tensor(self.data_counts, dtype=torch.int64, device=self.dist.device)
        dist.all_reduce(counts)  # all ranks, over the run; bad samples are also warned about as they come
        bad_replaced, padded = counts.tolist()
        values.update(data_bad_replaced=bad_replaced, data_padded=padded)
        self.log.scalars(self.step, values)
        self.log.advance(self.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{values['images_per_s']:.1f}",
                         step_s=f"{values['step_time_s']:.3f}")

    # ---- checkpoints, exports, samples ----------------------------------------------------------
    def save(self, nonfinite: torch.Tensor) -> None:
        """Checkpoint and export this step, unless the loss or the weights went bad or this step is
        saved already."""
        self._check_finite(nonfinite)
        self._check_finite(self._weights_nonfinite(), "trained weights")
        if self._from_rank0((self.ckpt_dir / ckpt.tag_for(self.step) / ckpt.COMMIT_MARKER).exists()):
            return
        state = {"step": self.step, "micro_step": self.micro_step, "epoch": self.epoch,
                 "batch_in_epoch": self.batch_in_epoch, "rng": ckpt.rng_state(),
                 "data_counts": list(self.data_counts)}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, state,
                                    self.cfg.checkpoint.keep_last, self.dist.is_main)
        self.export(self.run_dir / "exports" / path.name)
        if self.dist.is_main:
            kept = {p.name for p in ckpt.committed_checkpoints(self.ckpt_dir)}
            for old in (self.run_dir / "exports").glob("step-*"):
                if old.name not in kept:
                    shutil.rmtree(old, ignore_errors=True)
        self.log.info(f"saved checkpoint {path}")

    def export(self, out_dir: Path) -> None:
        cfg = self.cfg
        meta = {"base_model": str(Path(cfg.model.pretrained_dir).resolve()), "step": self.step,
                "unet_mode": cfg.model.unet_mode, "tokens": self.defect_tokens if self.tokens else {},
                "vectors_per_token": cfg.textual_inversion.vectors_per_token,
                "resolution_px": cfg.data.resolution_px,
                "mask_gating": cfg.model.unet_mode == "lora" and cfg.lora.mask_gating,
                "mask_resize": cfg.lora.mask_resize,
                "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                         "target_modules": cfg.lora.target_modules}}
        ckpt.export_weights(self.engine.module, out_dir, meta=meta, unet_mode=cfg.model.unet_mode,
                            tokens=self.tokens, vectors_per_token=cfg.textual_inversion.vectors_per_token,
                            zero_stage=zero_stage(self.ds_config), is_main=self.dist.is_main)

    def sample_grid(self) -> None:
        """Every rank renders (ZeRO-3 gathers weights collectively); rank 0 writes the PNG."""
        from defect_ds.train.sample_grid import render_sample_grid

        model = self.engine.module
        prompts = self.cfg.logging.sample_prompts or [
            f"a photo with {t}" for t in self.tokens] or ["a photo of a defect"]
        prompts = [expand_prompt(p, self.tokens, self.cfg.textual_inversion.vectors_per_token) for p in prompts]
        out = self.run_dir / "samples" / f"{ckpt.tag_for(self.step)}.png"
        # frozen weights are stored in the compute dtype: the pipeline runs under the same autocast
        with torch.autocast(self.dist.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            render_sample_grid(model.unet, model.text_encoder, self.vae, self.tokenizer, self.noise_scheduler,
                               prompts, resolution_px=self.cfg.data.resolution_px,
                               steps=self.cfg.logging.sample_steps, seed=self.cfg.train.seed,
                               mask_gating=model.mask_gating, out_path=out if self.dist.is_main else None)
        model.unet.train()

