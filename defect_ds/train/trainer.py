"""The training loop: masked LoRA and textual inversion on a DeepSpeed engine.

    deepspeed --num_gpus 2 train.py --config configs/default.toml

The model and its loss are built in `model/defect_model.py`; this module sets up the engine, the
optimizer and the schedule, and runs the loop: step, log, checkpoint, sample, profile.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from defect_ds.config import RunConfig, save_config
from defect_ds.data.loader import build_loader
from defect_ds.model.defect_model import DefectDiffusionModel, build_model
from defect_ds.perf.mfu import make_meter
from defect_ds.train import checkpoint as ckpt
from defect_ds.train.distributed import DistInfo, from_rank0, uses_offload, zero_stage
from defect_ds.train.export import Exporter
from defect_ds.train.logger import make_logger
from defect_ds.train.monitors import FiniteCheck, Interval, ProfilerWindow
from defect_ds.train.preflight import RunInputs, check_run_inputs
from defect_ds.train.sample_grid import SampleGrids
from defect_ds.utils.device import resolve_dtype
from defect_ds.utils.memory import retain_freed_memory
from defect_ds.utils.quiet import quiet_libraries


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo, inputs: RunInputs | None = None):
        """inputs: what `check_run_inputs` found (train.py checks before the process group starts);
        None checks them in `setup`."""
        self.cfg = cfg
        self.dist = dist_info
        self.inputs = inputs
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0  # optimizer steps done
        self.micro_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.data_counts = [0, 0]  # this rank's bad samples replaced, samples padded, over the run

    # ---- building -------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed  # slow to import: train.py validates the config first

        cfg, device = self.cfg, self.dist.device
        # ZeRO calls a torch collective that torch has since renamed: the notice is DeepSpeed's to act on
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        if device.type == "cpu":
            retain_freed_memory()  # activations are reused every step: no page faults for them (utils/memory.py)
        if self.inputs is None:
            self.inputs = check_run_inputs(cfg, self.dist.world_size)
        self.ds_config = self.inputs.ds_config
        manifest = self.inputs.manifest
        defect_tokens: dict[str, str] = dict(manifest.get("defect_tokens", {}))

        torch.manual_seed(cfg.train.seed)  # identical new-layer weights on every rank
        tokens = list(defect_tokens.values()) if cfg.textual_inversion.enabled else []
        with quiet_libraries():  # loading bars and notices of the model's parts
            model = build_model(cfg.model, cfg.lora, cfg.textual_inversion, cfg.loss, tokens=tokens,
                                compute_dtype=resolve_dtype(cfg.train.precision, device), device=device,
                                defer_layout=True)
        optimizer = self._optimizer(model, device)
        self.engine, _, _, self.lr_schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self._schedule(optimizer), config=self.ds_config)
        # the run's record is written only now: a launch whose inputs, model or engine fail leaves an
        # existing run's config.json, metrics.jsonl and tensorboard/ as they were
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.json")
        dist.barrier()
        self.log = make_logger(cfg.logging, self.run_dir, self.dist.is_main)
        if cfg.model.compile:
            self.engine.compile()
        self.model: DefectDiffusionModel = self.engine.module
        if self.model.channels_last and zero_stage(self.ds_config) < 3:  # ZeRO-3 keeps weights partitioned
            self.model.use_channels_last()
        else:
            self.model.channels_last = False
        self.exporter = Exporter(cfg.model, cfg.lora, cfg.textual_inversion, resolution_px=cfg.data.resolution_px,
                                 defect_tokens=defect_tokens, zero_stage=zero_stage(self.ds_config),
                                 is_main=self.dist.is_main)
        self.grids = SampleGrids(cfg.logging, self.run_dir / "samples", resolution_px=cfg.data.resolution_px,
                                 seed=cfg.train.seed, is_main=self.dist.is_main)
        self.finite = FiniteCheck(device, self._diverged)
        # what a lean checkpoint records so a resume can check it sits on the same base
        self.base_fingerprint = ckpt.base_fingerprint(cfg.model.pretrained_dir)
        self.trained_parameters = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self._maybe_resume()
        self.meter = make_meter(cfg.model, cfg.lora, cfg.data.resolution_px, self.model.vae, self.model, self.dist,
                                manifest, peak_tflops_override=cfg.logging.peak_tflops)

    def _optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        cfg = self.cfg.optimizer
        unet_params = [p for p in model.unet.parameters() if p.requires_grad]
        text_params = [p for p in model.text_encoder.parameters() if p.requires_grad]
        groups = []
        if unet_params:
            groups.append({"params": unet_params, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay})
        if text_params:  # no decay: it would pull the token vectors towards zero
            groups.append({"params": text_params, "lr": self.cfg.textual_inversion.learning_rate,
                           "weight_decay": 0.0})
        kwargs = dict(betas=tuple(cfg.betas), eps=cfg.eps)
        if uses_offload(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds a CPU op on first import

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)

    def _schedule(self, optimizer: torch.optim.Optimizer):
        from diffusers.optimization import get_scheduler  # diffusers is slow to import

        cfg = self.cfg.optimizer
        name = "cosine" if cfg.schedule == "cosine" else "constant_with_warmup"
        return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=self.cfg.train.max_steps)

    def _maybe_resume(self) -> None:
        tag = from_rank0(self.inputs.resume_tag)  # checked before the model loaded; rank 0 decides
        if tag is None:
            if self.cfg.checkpoint.resume:
                self.log.info("checkpoint.resume=latest: no committed checkpoint yet, starting fresh")
            return
        state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag, base_fingerprint=self.base_fingerprint,
                                     trained_parameters=self.trained_parameters)
        self.step, self.micro_step = state["step"], state["micro_step"]
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.data_counts = list(state.get("data_counts", [0, 0]))
        ckpt.set_rng_state(state["rng"])
        self.log.info(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> torch.Tensor:
        """One micro batch: the model's loss, backward, and the engine's step (which applies the
        optimizer only at the accumulation boundary). Returns the loss, detached, on the device."""
        seed = (self.cfg.train.seed * 1_000_003 + self.micro_step) * self.dist.world_size + self.dist.rank
        generator = torch.Generator(self.dist.device).manual_seed(seed)
        torch.manual_seed(seed)  # LoRA dropout, identical on an exact resume
        loss = self.model.loss(batch, generator, denoise=self.engine)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        per_epoch = self.inputs.batches_per_epoch  # 1 or more: checked before the model loaded
        end = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        interval = Interval(self.dist.device)
        profiler = ProfilerWindow(cfg.logging.profile_at_step, cfg.logging.profile_steps, end,
                                  self.run_dir / "profile" / f"trace-rank{self.dist.rank}.json",
                                  self.dist.device, self.log.info)
        profiler.at_step(self.step)
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
                interval.add(self.train_step(batch), len(batch["caption"]))
                self.micro_step += 1
                self.batch_in_epoch += 1
                if self.micro_step % cfg.train.grad_accum_steps == 0:
                    self.step += 1
                    interval.steps += 1
                    self.log.advance(self.step)
                    profiler.at_step(self.step)
                    if self.step % cfg.logging.log_every_steps == 0 or self.step == end:
                        self._log_interval(interval)
                        interval = interval.next()
                    if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                        self.save(interval.nonfinite)
                    if self.grids.due(self.step):
                        self.grids.render(self.model, ckpt.tag_for(self.step))
                    if self.step >= end:
                        break
                fetch_start = time.perf_counter()
        if cfg.checkpoint.save_final or self.step < cfg.train.max_steps:  # a stopped launch must resume
            self.save(interval.nonfinite)  # no-op when this step is already checkpointed
        else:
            self.finite.check(interval.nonfinite, self.step)
        self.exporter.write(self.model, self.run_dir / "export", self.step)
        if cfg.logging.sample_every_steps and not from_rank0(self.grids.path(ckpt.tag_for(self.step)).exists()):
            self.grids.render(self.model, ckpt.tag_for(self.step))
        self.log.close()

    def _log_interval(self, interval: Interval) -> None:
        self.finite.check(interval.nonfinite, self.step)
        elapsed = time.perf_counter() - interval.start
        loss_sum = interval.loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / self.dist.world_size / max(1, interval.micro_steps)
        lr = self.lr_schedule.get_last_lr()[0]
        samples = interval.samples * self.dist.world_size
        values = {"loss": loss, "lr": lr, "images_per_s": samples / max(elapsed, 1e-9),
                  "step_time_s": elapsed / max(1, interval.steps), "epoch": self.epoch}
        values.update(self.meter.report(elapsed=elapsed, samples=samples, data_wait=interval.data_wait_s))
        counts = torch.tensor(self.data_counts, dtype=torch.int64, device=self.dist.device)
        dist.all_reduce(counts)  # all ranks, over the run; bad samples are also warned about as they come
        bad_replaced, padded = counts.tolist()
        values.update(data_bad_replaced=bad_replaced, data_padded=padded)
        self.log.scalars(self.step, values)
        self.log.advance(self.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{values['images_per_s']:.1f}",
                         step_s=f"{values['step_time_s']:.3f}")

    def _diverged(self, what: str, step: int) -> str:
        done = ckpt.committed_checkpoints(self.ckpt_dir)
        kept = f"the last good checkpoint {done[-1]} is kept" if done else "no checkpoint was written"
        self.log.close()
        return (f"The {what} became NaN or infinite by step {step}; {kept}; lower optimizer.learning_rate or "
                "check the data, then resume with --checkpoint.resume=latest.")

    # ---- checkpoints and exports ----------------------------------------------------------------
    def save(self, nonfinite: torch.Tensor) -> None:
        """Checkpoint and export this step, unless the loss or the weights went bad or this step is
        saved already."""
        self.finite.check(nonfinite, self.step)
        self.finite.check_weights(self.model, self.step)
        if from_rank0((self.ckpt_dir / ckpt.tag_for(self.step) / ckpt.COMMIT_MARKER).exists()):
            return
        state = {"step": self.step, "micro_step": self.micro_step, "epoch": self.epoch,
                 "batch_in_epoch": self.batch_in_epoch, "rng": ckpt.rng_state(),
                 "data_counts": list(self.data_counts), "base_fingerprint": self.base_fingerprint,
                 "trained_parameters": self.trained_parameters}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, state,
                                    self.cfg.checkpoint.keep_last, self.dist.is_main)
        try:
            self.exporter.write(self.model, self.run_dir / "exports" / path.name, self.step)
        except OSError as e:  # a full disk: the checkpoint itself is committed already
            raise ckpt.CheckpointWriteError(ckpt.write_failure_message(e, self.ckpt_dir, self.step)) from None
        self.exporter.prune(self.run_dir / "exports", {p.name for p in ckpt.committed_checkpoints(self.ckpt_dir)})
        self.log.info(f"saved checkpoint {path}")
