"""What the loop does besides the step: the log interval's tallies, and the periodic actions (the
non-finite check, the profiler window; the trainer adds logging, checkpoints and sample grids). Every
action has the same two methods, `due(step)` and `run(step, state)`: the loop asks each action after
every optimizer step, so adding one is a change in one place.

    python -c "import torch; from defect_ds.train.monitors import Interval; i = Interval(torch.device('cpu')); \
i.add(torch.tensor(1.0), 4); print(i.samples)"
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from defect_ds.train.state import TrainState


class TrainingDiverged(RuntimeError):
    """The loss or a trained weight became NaN or infinite."""


class Action(Protocol):
    """Something the loop does at some optimizer steps, after the step."""

    def due(self, step: int) -> bool: ...

    def run(self, step: int, state: TrainState) -> None: ...


class Every:
    """`fn(step, state)` every `every_steps` optimizer steps (0: never) and at `last_step` if one is given."""

    def __init__(self, every_steps: int, fn: Callable[[int, TrainState], None], last_step: int | None = None):
        self.every_steps, self.fn, self.last_step = every_steps, fn, last_step

    def due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0 or step == self.last_step

    def run(self, step: int, state: TrainState) -> None:
        self.fn(step, state)


class Interval:
    """Counters between two log steps; the loss stays on the device until it is logged."""

    def __init__(self, device: torch.device):
        self.start = time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.micro_steps = self.steps = self.samples = 0
        self.data_wait_s = 0.0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss
        self.micro_steps += 1
        self.samples += samples


class FiniteCheck:
    """Stops the run, on every rank at once, when any rank saw a NaN or infinite loss since the start.

    `observe` every loss (no host sync); as an action it is due whenever one of `before` is (logging,
    saving), so a diverged value is never logged as a number or checkpointed. `on_diverged(what, step)`
    closes the logger and returns the sentence to raise (which checkpoint is kept)."""

    def __init__(self, device: torch.device, on_diverged: Callable[[str, int], str], before: tuple[Action, ...] = ()):
        self.device = device
        self.on_diverged = on_diverged
        self.before = before
        self.nonfinite = torch.zeros((), device=device, dtype=torch.bool)

    def observe(self, loss: torch.Tensor) -> None:
        self.nonfinite |= ~torch.isfinite(loss)

    def due(self, step: int) -> bool:
        return any(action.due(step) for action in self.before)

    def run(self, step: int, state: TrainState) -> None:
        self.check(self.nonfinite, step)

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

    def due(self, step: int) -> bool:
        """With the optimizer steps done, before the loop and after every step: the window starts or ends."""
        starts = self.profiler is None and self.first and step == self.first - 1 and step < self.end
        ends = self.profiler is not None and (step >= self.first + self.count - 1 or step >= self.end)
        return bool(starts or ends)

    def run(self, step: int, state: TrainState) -> None:
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        else:
            self.profiler.stop()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.out))
            self.log(f"wrote profiler trace {self.out} (steps {self.first}..{step})")
            self.profiler = None
