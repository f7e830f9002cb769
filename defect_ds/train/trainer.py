"""The training loop: masked LoRA and textual inversion on a DeepSpeed engine.

    deepspeed --num_gpus 2 train.py --config configs/default.toml

The model and its loss are built in `model/defect_model.py`; this module sets up the engine, the
optimizer and the schedule, and runs the loop: a step, then each periodic action that is due (profile,
non-finite check, log, checkpoint, sample grid). The loop's counters live in one `TrainState`.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from defect_ds.config import ConfigError, RunConfig, save_config
from defect_ds.data.loader import build_loader
from defect_ds.model.defect_model import DefectDiffusionModel, build_model
from defect_ds.perf.mfu import make_meter
from defect_ds.train import checkpoint as ckpt
from defect_ds.train.distributed import DistInfo, from_rank0, uses_offload, zero_stage
from defect_ds.train.export import Exporter
from defect_ds.train.logger import make_logger
from defect_ds.train.monitors import Action, Every, FiniteCheck, Interval, ProfilerWindow
from defect_ds.train.preflight import RunInputs, check_run_inputs
from defect_ds.train.resume import launch_record, to_universal
from defect_ds.train.sample_grid import SampleGrids
from defect_ds.train.state import TrainState
from defect_ds.train.stop import StopRequest
from defect_ds.utils.device import resolve_dtype
from defect_ds.utils.memory import retain_freed_memory
from defect_ds.utils.quiet import quiet_libraries


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo, inputs: RunInputs | None = None,
                 stop: StopRequest | None = None):
        """inputs: what `check_run_inputs` found (train.py checks before the process group starts);
        None checks them in `setup`. stop: the signal handler train.py installed first thing; None
        installs one when the loop starts."""
        self.cfg = cfg
        self.dist = dist_info
        self.inputs = inputs
        self.stop = stop
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState()

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
        self.resume_dir = self._convert_for_world_size()  # before anything is written: a failure leaves config.json
        defect_tokens: dict[str, str] = dict(manifest.get("defect_tokens", {}))

        torch.manual_seed(cfg.train.seed)  # identical new-layer weights on every rank
        tokens = list(defect_tokens.values()) if cfg.textual_inversion.enabled else []
        with quiet_libraries():  # loading bars and notices of the model's parts
            model = build_model(cfg.model, cfg.lora, cfg.textual_inversion, cfg.loss, tokens=tokens,
                                compute_dtype=resolve_dtype(cfg.train.precision, device), device=device,
                                defer_layout=True,
                                zero3_config=self.ds_config if zero_stage(self.ds_config) == 3 else None)
        optimizer = self._optimizer(model, device)
        self.engine, _, _, self.lr_schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self._schedule(optimizer), config=self.ds_config)
        # the run's record is written only now: a launch whose inputs, model or engine fail leaves an
        # existing run's config.json, metrics.jsonl and tensorboard/ as they were
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.json")
        dist.barrier()
        tag = self.inputs.resume_tag
        self.log = make_logger(cfg.logging, self.run_dir, self.dist.is_main, ckpt.step_of(tag) if tag else 0)
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
        self.grids = SampleGrids(cfg.logging, self.model, self.run_dir / "samples",
                                 resolution_px=cfg.data.resolution_px, seed=cfg.train.seed, is_main=self.dist.is_main)
        # what a lean checkpoint records so a resume can check it sits on the same base, data and config
        self.base_fingerprint = self.inputs.base_fingerprint
        self.launch_record = launch_record(cfg, self.dist.world_size, manifest)
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
        state = ckpt.load_checkpoint(self.engine, self.resume_dir, tag, base_fingerprint=self.base_fingerprint,
                                     trained_parameters=self.trained_parameters)
        self.state.load_state_dict(state)
        ckpt.set_rng_state(state["rng"])
        saved_world_size = self.inputs.resume.saved_world_size
        if saved_world_size != self.dist.world_size:
            # the same share of the epoch done, in micro batches of this world size
            self.state.batch_in_epoch = self.state.batch_in_epoch * saved_world_size // self.dist.world_size
            dist.barrier()
            if self.dist.is_main and self.resume_dir != self.ckpt_dir:
                shutil.rmtree(self.resume_dir, ignore_errors=True)  # loaded: the universal copy has done its job
        for note in self.inputs.resume.notes:
            self.log.info(note)
        self.log.info(f"resumed from {self.ckpt_dir / tag} at step {self.state.step}, saved by {saved_world_size} "
                      f"process(es), now {self.dist.world_size}")

    def _convert_for_world_size(self) -> Path:
        """The folder to resume from: the checkpoints themselves, or, when the world size changed and ZeRO
        partitioned the optimizer state, a universal copy rank 0 makes of the resume checkpoint."""
        plan, tag = self.inputs.resume, self.inputs.resume_tag
        if not tag or not self.ds_config.get("checkpoint", {}).get("load_universal"):
            return self.ckpt_dir
        refusal = None
        if self.dist.is_main:
            try:
                to_universal(self.ckpt_dir, tag, plan.saved_world_size, self.dist.world_size)
            except ConfigError as e:
                refusal = str(e)
        refusal = from_rank0(refusal)
        if refusal:
            raise ConfigError(refusal)
        return self.ckpt_dir / "universal"

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> torch.Tensor:
        """One micro batch: the model's loss, backward, and the engine's step (which applies the
        optimizer only at the accumulation boundary). Returns the loss, detached, on the device."""
        seed = (self.cfg.train.seed * 1_000_003 + self.state.micro_step) * self.dist.world_size + self.dist.rank
        generator = torch.Generator(self.dist.device).manual_seed(seed)
        torch.manual_seed(seed)  # LoRA dropout, identical on an exact resume
        loss = self.model.loss(batch, generator, denoise=self.engine)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, state = self.cfg, self.state
        per_epoch = self.inputs.batches_per_epoch  # 1 or more: checked before the model loaded
        end = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        self.interval = Interval(self.dist.device)
        actions = self._actions(end)
        self._run_due([self.profiler], state)  # a window that opens at the next step starts before it
        self.stop = self.stop or StopRequest(self.dist.rank)
        self.stop.arm()
        self.log.start(cfg.train.max_steps, state.step)
        while state.step < end and not self.stop.agreed_signum:
            if state.batch_in_epoch >= per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            loader = build_loader(cfg.data, micro_batch_size=cfg.train.micro_batch_size,
                                  rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.train.seed,
                                  epoch=state.epoch, skip_batches=state.batch_in_epoch)
            replaced_before, padded_before = state.samples_replaced, state.samples_padded
            fetch_start = time.perf_counter()
            for batch in loader:
                self.interval.data_wait_s += time.perf_counter() - fetch_start
                state.samples_replaced = replaced_before + loader.num_replaced
                state.samples_padded = padded_before + loader.num_padded
                loss = self.train_step(batch)
                self.interval.add(loss, len(batch["caption"]))
                self.finite.observe(loss)
                state.micro_step += 1
                state.batch_in_epoch += 1
                if state.micro_step % cfg.train.grad_accum_steps == 0:
                    state.step += 1
                    self.interval.steps += 1
                    self.log.advance(state.step)
                    self._run_due(actions, state)
                    if state.step >= end or self.stop.agreed():  # a signal: every rank stops at this step
                        break
                fetch_start = time.perf_counter()
        self.finite.run(state.step, state)
        signalled = bool(self.stop.agreed_signum)
        if signalled or cfg.checkpoint.save_final or state.step < cfg.train.max_steps:  # a stopped launch must resume
            self.save(state.step, state)  # no-op when this step is already checkpointed
        if signalled:  # the run is not done: no final export or grid
            self.log.close()
            raise self.stop.stopped(state.step, ckpt.tag_for(state.step))
        self.exporter.write(self.model, self.run_dir / "export", state.step)
        if cfg.logging.sample_every_steps and not from_rank0(self.grids.path(state.step).exists()):
            self.grids.run(state.step, state)
        self.log.close()

    def _actions(self, end: int) -> list[Action]:
        """What runs after an optimizer step when it is due, in this order."""
        cfg = self.cfg
        self.profiler = ProfilerWindow(cfg.logging.profile_at_step, cfg.logging.profile_steps, end,
                                       self.run_dir / "profile" / f"trace-rank{self.dist.rank}.json",
                                       self.dist.device, self.log.info)
        log = Every(cfg.logging.log_every_steps, self._log_interval, last_step=end)
        checkpoint = Every(cfg.checkpoint.every_steps, self.save)
        # before logging or saving: a NaN loss is neither logged as a number nor checkpointed
        self.finite = FiniteCheck(self.dist.device, self._diverged, before=(log, checkpoint))
        return [self.profiler, self.finite, log, checkpoint, self.grids]

    @staticmethod
    def _run_due(actions: list[Action], state: TrainState) -> None:
        """Runs each action that is due at the state's step, in order."""
        for action in actions:
            if action.due(state.step):
                action.run(state.step, state)

    def _log_interval(self, step: int, state: TrainState) -> None:
        interval = self.interval
        elapsed = time.perf_counter() - interval.start
        loss_sum = interval.loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / self.dist.world_size / max(1, interval.micro_steps)
        lr = self.lr_schedule.get_last_lr()[0]
        samples = interval.samples * self.dist.world_size
        values = {"loss": loss, "lr": lr, "images_per_s": samples / max(elapsed, 1e-9),
                  "step_time_s": elapsed / max(1, interval.steps), "epoch": state.epoch}
        values.update(self.meter.report(elapsed=elapsed, samples=samples, data_wait=interval.data_wait_s))
        counts = torch.tensor([state.samples_replaced, state.samples_padded], dtype=torch.int64,
                              device=self.dist.device)
        dist.all_reduce(counts)  # all ranks, over the run; bad samples are also warned about as they come
        bad_replaced, padded = counts.tolist()
        values.update(data_bad_replaced=bad_replaced, data_padded=padded)
        self.log.scalars(step, values)
        self.log.advance(step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{values['images_per_s']:.1f}",
                         step_s=f"{values['step_time_s']:.3f}")
        self.interval = Interval(self.dist.device)  # started after logging: its cost is not the next steps'

    def _diverged(self, what: str, step: int) -> str:
        done = ckpt.committed_checkpoints(self.ckpt_dir)
        kept = f"the last good checkpoint {done[-1]} is kept" if done else "no checkpoint was written"
        self.log.close()
        return (f"The {what} became NaN or infinite by step {step}; {kept}; lower optimizer.learning_rate or "
                "check the data, then resume with --checkpoint.resume=latest.")

    # ---- checkpoints and exports ----------------------------------------------------------------
    def save(self, step: int, state: TrainState) -> None:
        """Checkpoint and export this step, unless the weights went bad or this step is saved already
        (the loss is checked before: `FiniteCheck` runs first)."""
        self.finite.check_weights(self.model, step)
        if from_rank0((self.ckpt_dir / ckpt.tag_for(step) / ckpt.COMMIT_MARKER).exists()):
            return
        client_state = {**state.state_dict(), "rng": ckpt.rng_state(), "base_fingerprint": self.base_fingerprint,
                        "trained_parameters": self.trained_parameters}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_dir, step, client_state,
                                    self.cfg.checkpoint.keep_last, self.dist.is_main, self.launch_record)
        try:
            self.exporter.write(self.model, self.run_dir / "exports" / path.name, step)
        except OSError as e:  # a full disk: the checkpoint itself is committed already
            raise ckpt.CheckpointWriteError(ckpt.write_failure_message(e, self.ckpt_dir, step)) from None
        self.exporter.prune(self.run_dir / "exports", {p.name for p in ckpt.committed_checkpoints(self.ckpt_dir)})
        self.log.info(f"saved checkpoint {path}")
