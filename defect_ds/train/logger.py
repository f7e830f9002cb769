"""Logging that never asks "am I rank 0?": off rank 0 every method does nothing.

Console lines and a rich progress bar, TensorBoard scalars, and metrics.jsonl in the run directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from defect_ds.config import LoggingConfig


class NullLogger:
    def start(self, total_steps: int, done_steps: int) -> None: ...
    def advance(self, step: int, **fields) -> None: ...
    def scalars(self, step: int, values: dict) -> None: ...
    def info(self, message: str) -> None: ...
    def close(self) -> None: ...


class RunLogger(NullLogger):
    def __init__(self, cfg: LoggingConfig, run_dir: Path, first_step: int = 0):
        """first_step: the step the run continues from; what an earlier launch logged after it goes, so
        a resumed run logs each step once."""
        from rich.console import Console

        self.cfg = cfg
        self.console = Console(stderr=True)
        keep_until(run_dir / "metrics.jsonl", first_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step + 1)
        self.progress = None
        self.task = None

    def start(self, total_steps: int, done_steps: int) -> None:
        if not self.cfg.progress_bar:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s  "
                       "{task.fields[step_s]} s/step"),
            console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=done_steps,
                                           loss="-", lr="-", ips="-", step_s="-")
        self.progress.start()

    def advance(self, step: int, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **fields)

    def scalars(self, step: int, values: dict) -> None:
        clean = {k: v for k, v in values.items() if v is not None}
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.progress is None:
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in clean.items())
            self.console.print(f"step {step}  {shown}")

    def info(self, message: str) -> None:
        self.console.print(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()


def keep_until(metrics: Path, step: int) -> None:
    """Drops the records after `step` from a metrics.jsonl (those a resumed run logs again)."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        from defect_ds.utils.files import atomic_write_text

        atomic_write_text(metrics, "".join(kept))


def make_logger(cfg: LoggingConfig, run_dir: Path, is_main: bool, first_step: int = 0) -> NullLogger:
    return RunLogger(cfg, run_dir, first_step) if is_main else NullLogger()
