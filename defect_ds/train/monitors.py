"""What the loop keeps an eye on besides the step: the log interval's tallies, non-finite values,
the profiler window. Each is a small object the loop calls at fixed points of its schedule.

    python -c "import torch; from defect_ds.train.monitors import Interval; i = Interval(torch.device('cpu')); \
i.add(torch.tensor(1.0), 4); print(i.samples)"
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """The loss or a trained weight became NaN or infinite."""


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

    def next(self) -> "Interval":
        """A fresh interval that keeps this one's non-finite flag (it is checked again before a save)."""
        return Interval(self.loss_sum.device, self.nonfinite)


class FiniteCheck:
    """Stops the run, on every rank at once, when any rank saw a NaN or infinite value.

    `on_diverged(what, step)` closes the logger and returns the sentence to raise (which checkpoint is kept)."""

    def __init__(self, device: torch.device, on_diverged: Callable[[str, int], str]):
        self.device = device
        self.on_diverged = on_diverged

    def check(self, nonfinite: torch.Tensor, step: int, what: str = "loss") -> None:
        flag = nonfinite.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a host sync: only at log and save steps
        if flag.item() > 0:
            raise TrainingDiverged(self.on_diverged(what, step))

    def check_weights(self, module: torch.nn.Module, step: int) -> None:
        """Whether any trainable weight became NaN or infinite (the update after the last checked loss
        can still have blown up). Under ZeRO-3 each rank checks its own partition."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for p in module.parameters():
            if p.requires_grad:
                local = p.ds_tensor if hasattr(p, "ds_tensor") else p
                bad |= ~torch.isfinite(local).all()
        self.check(bad, step, "trained weights")


class ProfilerWindow:
    """Profiles steps first .. first+count-1: starts before the first, then writes
    run_dir/profile/trace-rank{rank}.json (chrome://tracing, perfetto) after the last or at `end`."""

    def __init__(self, first: int, count: int, end: int, out: Path, device: torch.device,
                 log: Callable[[str], None]):
        self.first, self.count, self.end, self.out, self.device, self.log = first, count, end, out, device, log
        self.profiler: torch.profiler.profile | None = None

    def at_step(self, step: int) -> None:
        """Call with the optimizer steps done, before the loop and after every step."""
        if self.profiler is None and self.first and step == self.first - 1 and step < self.end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        elif self.profiler is not None and (step >= self.first + self.count - 1 or step >= self.end):
            self.profiler.stop()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.out))
            self.log(f"wrote profiler trace {self.out} (steps {self.first}..{step})")
            self.profiler = None
