"""`defect-ds bench`: a speed and memory sweep, one `deepspeed` training process per point.

    defect-ds bench --arch tiny --zero 2,3,3o --accum 1,2 --micro-batch 4,2 --checkpointing on,off \\
        --latents off,on --grid around-base

Axes: ZeRO stage (0 = plain data parallelism, 1, 2, 3, 3o = ZeRO-3 with CPU offload), gradient
accumulation, micro batch, activation checkpointing, precomputed latents, what of the UNet trains (LoRA or
full) and the LoRA rank. `--grid product` runs every combination; `--grid around-base`
runs the base point (the first value of every axis) and then each other value with the rest at base.

Each point is `deepspeed --num_gpus N train.py --config ... --train.ds_config=... ...` in its own run
directory; the trainer logs every `--interval-steps` steps and the first `--warmup-intervals`
intervals are left out, so start-up, allocator warm-up and the first-step compilation are not
measured. While a point runs, each rank's peak resident memory (the kernel's high-water mark) and the
machine's free memory are read twice a second; a point that would leave less than `--memory-reserve-gib`
free is stopped before the kernel's OOM killer ends other processes and recorded as "does not fit" with
the memory it reached. A point that fails (an offload op that will not build, a timeout) is recorded with
its error and the sweep goes on. After every point the results are rewritten: raw JSON (every
point's overrides, resolved config, interval metrics, error), a markdown table with the device,
library versions and the resolved configs, and a PNG plot. `--profile-point NAME` adds one unmeasured
interval to that point with a torch profiler trace (`RUN_DIR/profile/trace-rank{rank}.json`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from defect_ds.config import load_config
from defect_ds.perf.mfu import peak_tflops
from defect_ds.perf.sweep_report import write_results
from defect_ds.utils.device import cpu_name  # benchmarks/ and downstream/ import it from here too
from defect_ds.utils.net import free_port

ROOT = Path(__file__).resolve().parents[2]
ZERO_CONFIGS = {"0": "ds_configs/zero0.json", "1": "ds_configs/zero1.json", "2": "ds_configs/zero2.json",
                "3": "ds_configs/zero3.json", "3o": "ds_configs/zero3_offload.json"}
ARCH_DEFAULTS = {  # model folder, image shards, resolution
    "tiny": ("work/tiny-sd", "work/data/synthetic", 64),
    "sd15": ("work/sd15", "work/data/synthetic-512", 512),
}
LIBRARIES = ("torch", "deepspeed", "diffusers", "peft", "transformers", "webdataset")
UNET_MODES = ("lora", "full")
GIB = 2 ** 30


# ---- the grid -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    zero: str  # "2", "3" or "3o" (ZeRO-3 with optimizer and parameter offload to the CPU)
    accum: int  # gradient accumulation steps
    micro_batch: int  # samples per rank per forward pass
    checkpointing: bool  # activation checkpointing of the UNet blocks
    latents: bool  # train from precomputed VAE latents instead of images
    unet_mode: str = "lora"  # what of the UNet trains: LoRA adapters or every weight
    lora_rank: int = 0  # LoRA rank; 0: the run config's (ignored when unet_mode is full)

    @property
    def name(self) -> str:
        name = (f"z{self.zero}_a{self.accum}_mb{self.micro_batch}_{'ckpt' if self.checkpointing else 'nockpt'}_"
                f"{'lat' if self.latents else 'img'}")
        if self.unet_mode == "full":
            return name + "_full"
        return name + (f"_r{self.lora_rank}" if self.lora_rank else "")


def parse_axes(zero: str, accum: str, micro_batch: str, checkpointing: str, latents: str,
               unet_mode: str = "lora", lora_rank: str = "0") -> dict[str, list]:
    """Comma-separated command-line values -> typed axis values (the first of each is the base)."""
    def ints(text: str, flag: str, least: int = 1) -> list[int]:
        try:
            values = [int(v) for v in _split(text)]
        except ValueError:
            raise ValueError(f"{flag} {text!r} is invalid: use comma-separated integers such as 1,2.") from None
        if not values or min(values) < least:
            raise ValueError(f"{flag} {text!r} is invalid: use comma-separated integers of {least} or more.")
        return values

    def switches(text: str, flag: str) -> list[bool]:
        words = {"on": True, "true": True, "off": False, "false": False}
        values = _split(text)
        if not values or any(v not in words for v in values):
            raise ValueError(f"{flag} {text!r} is invalid: use on, off or on,off.")
        return [words[v] for v in values]

    zeros = _split(zero)
    if not zeros or any(z not in ZERO_CONFIGS for z in zeros):
        raise ValueError(f"--zero {zero!r} is invalid: use comma-separated stages from 0, 1, 2, 3, 3o.")
    modes = _split(unet_mode)
    if not modes or any(m not in UNET_MODES for m in modes):
        raise ValueError(f"--unet-mode {unet_mode!r} is invalid: use lora, full or lora,full.")
    return {"zero": zeros, "accum": ints(accum, "--accum"), "micro_batch": ints(micro_batch, "--micro-batch"),
            "checkpointing": switches(checkpointing, "--checkpointing"), "latents": switches(latents, "--latents"),
            "unet_mode": modes, "lora_rank": ints(lora_rank, "--lora-rank", least=0)}


def _split(text: str) -> list[str]:
    return [v.strip().lower() for v in text.split(",") if v.strip()]


def expand_grid(axes: dict[str, list], grid: str = "product") -> list[Point]:
    """All combinations (`product`), or the base point then one axis changed at a time (`around-base`)."""
    names = [f.name for f in dataclasses.fields(Point)]
    if grid == "product":
        return _distinct([Point(*combo) for combo in itertools.product(*(axes[n] for n in names))])
    if grid != "around-base":
        raise ValueError(f"--grid {grid!r} is invalid: use product or around-base.")
    base = Point(*(axes[n][0] for n in names))
    points = [base]
    for n in names:
        for value in axes[n][1:]:
            point = dataclasses.replace(base, **{n: value})
            if point not in points:
                points.append(point)
    return _distinct(points)


def at_global_batch(points: list[Point], global_batch: int, num_gpus: int) -> list[Point]:
    """The points whose micro batch x accumulation x processes is `global_batch`; none is an error."""
    kept = [p for p in points if p.micro_batch * p.accum * num_gpus == global_batch]
    if not kept:
        raise ValueError(f"--global-batch {global_batch}: no --micro-batch x --accum pair times {num_gpus} "
                         "processes gives it.")
    return kept


def _distinct(points: list[Point]) -> list[Point]:
    """The rank means nothing when every UNet weight trains: full points differ in it only in name."""
    seen, out = set(), []
    for p in points:
        key = dataclasses.replace(p, lora_rank=0) if p.unet_mode == "full" else p
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


# ---- one point ----------------------------------------------------------------------------------
@dataclass
class Plan:
    """What every point shares."""
    config: str  # run config file
    model_dir: str
    images_dir: str  # image shards
    latents_dir: str  # latent shards (used by latents points)
    resolution_px: int
    precision: str
    num_gpus: int
    interval_steps: int  # optimizer steps per log interval
    warmup_intervals: int  # intervals left out of the measurement
    measure_intervals: int  # intervals measured
    work_dir: str  # one run directory per point under it
    extra_overrides: list[str]  # passed to train.py as given
    timeout_s: int = 1800
    memory_reserve_gib: float = 1.5  # a point is stopped as "does not fit" before less is left free

    @property
    def measured_steps(self) -> tuple[int, int]:
        """(first, last) optimizer step of the measured intervals."""
        first = self.warmup_intervals * self.interval_steps + 1
        return first, (self.warmup_intervals + self.measure_intervals) * self.interval_steps


def point_overrides(point: Point, plan: Plan, profile: bool = False) -> list[str]:
    _, last = plan.measured_steps
    steps = last + (plan.interval_steps if profile else 0)  # the profiled interval is not measured
    settings = {
        "model.pretrained_dir": plan.model_dir,
        "model.activation_checkpointing": str(point.checkpointing).lower(),
        "data.train_shards": plan.latents_dir if point.latents else plan.images_dir,
        "data.resolution_px": plan.resolution_px,
        "train.ds_config": ZERO_CONFIGS[point.zero],
        "train.micro_batch_size": point.micro_batch,
        "train.grad_accum_steps": point.accum,
        "train.max_steps": steps,
        "train.precision": plan.precision,
        "checkpoint.every_steps": 0,
        "logging.run_dir": str(Path(plan.work_dir) / point.name),
        "logging.log_every_steps": plan.interval_steps,
        "logging.sample_every_steps": 0,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "model.unet_mode": point.unet_mode,
    }
    if point.lora_rank and point.unet_mode == "lora":
        settings["lora.rank"] = settings["lora.alpha"] = point.lora_rank  # alpha / rank stays 1
    if profile:
        settings["logging.profile_at_step"] = last + 1
        settings["logging.profile_steps"] = min(3, plan.interval_steps)
    return [f"--{k}={v}" for k, v in settings.items()] + list(plan.extra_overrides)


def launch_command(point: Point, plan: Plan, profile: bool = False) -> list[str]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed), "--num_gpus", str(plan.num_gpus), "--master_port", str(free_port()), "train.py",
            "--config", plan.config, *point_overrides(point, plan, profile)]


# ---- memory ------------------------------------------------------------------------------------
def rank_of(cmdline: list[str]) -> int | None:
    """The local rank of a `train.py --local_rank=N` process; None for the runner, its launcher and others."""
    if not any(part.endswith("train.py") for part in cmdline):
        return None
    for i, part in enumerate(cmdline):
        if part.startswith("--local_rank="):
            return int(part.split("=", 1)[1])
        if part == "--local_rank" and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
    return None


def peak_rss_gib(pid: int) -> float | None:
    """The process's peak resident set size so far (VmHWM, kept by the kernel); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


@dataclass
class MemoryWatch:
    """Reads a launch's ranks twice a second: each rank's peak resident memory and the machine's free memory.

    When free memory falls under `reserve_gib`, the launch's process group is killed (SIGKILL: a SIGTERM
    would make the ranks save a checkpoint, which needs more memory) and `stopped` says so.
    """
    root_pid: int
    reserve_gib: float
    interval_s: float = 0.5
    available: Any = available_gib  # () -> GiB free; a test passes its own
    rank_peak_gib: dict[int, float] = field(default_factory=dict)
    ranks_rss_gib: float = 0.0  # the most the ranks held together at one reading
    min_available_gib: float | None = None
    stopped: bool = False

    def __post_init__(self) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-memory-watch", daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()

    def read(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            children = []
        together = 0.0
        for child in children:
            try:
                rank, rss = rank_of(child.cmdline()), child.memory_info().rss / GIB
            except (psutil.Error, ValueError):
                continue
            if rank is None:
                continue
            together += rss
            peak = peak_rss_gib(child.pid)
            self.rank_peak_gib[rank] = max(self.rank_peak_gib.get(rank, 0.0), peak or rss)
        self.ranks_rss_gib = max(self.ranks_rss_gib, together)
        free = self.available()
        self.min_available_gib = free if self.min_available_gib is None else min(self.min_available_gib, free)
        if free < self.reserve_gib and not self.stopped:
            self.stopped = True
            for proc in [*children, psutil.Process(self.root_pid)]:
                try:
                    proc.kill()
                except psutil.Error:
                    pass

    def _run(self) -> None:
        while not self._done.is_set():
            self.read()
            self._done.wait(self.interval_s)

    def record(self) -> dict[str, Any]:
        ranks = [round(self.rank_peak_gib[r], 2) for r in sorted(self.rank_peak_gib)]
        return {"rank_peak_rss_gib": ranks, "ranks_rss_gib": round(self.ranks_rss_gib, 2),
                "min_available_gib": None if self.min_available_gib is None else round(self.min_available_gib, 2),
                "reserve_gib": self.reserve_gib, "stopped": self.stopped}

    def does_not_fit(self) -> str:
        ranks = ", ".join(f"{g:.1f}" for g in self.record()["rank_peak_rss_gib"]) or "-"
        return (f"the ranks held {self.ranks_rss_gib:.1f} GiB together (peak per rank {ranks} GiB) "
                f"and {self.min_available_gib:.1f} GiB was left free; stopped before the kernel's OOM killer")


def run_point(point: Point, plan: Plan, env: dict[str, str], profile: bool = False) -> dict[str, Any]:
    """Runs one point to completion (or failure) and returns its result record."""
    run_dir = Path(plan.work_dir) / point.name
    if run_dir.exists():  # metrics.jsonl appends: a previous sweep's lines must not be read
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = launch_command(point, plan, profile)
    log_path = run_dir / "launcher.log"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    returncode, error = None, None
    with open(log_path, "w") as log:
        # own session: on a timeout the launcher and its ranks are ended together, by process group
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with MemoryWatch(proc.pid, plan.memory_reserve_gib) as memory:
            try:
                returncode = proc.wait(timeout=plan.timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                error = f"timed out after {plan.timeout_s} s"
        _end_group(proc.pid)  # ranks the runner left behind when it was killed
    wall_s = time.perf_counter() - start
    log_text = log_path.read_text(errors="replace")
    status = "ok"
    if memory.stopped:
        status, error = "does not fit", memory.does_not_fit()
    elif error is None and returncode != 0 and _oom_killed(log_text, returncode):
        status, error = "does not fit", ("a rank was killed by SIGKILL (the kernel's OOM killer, "
                                         f"most likely) at {memory.ranks_rss_gib:.1f} GiB held by the ranks")
    elif error is None and returncode != 0:
        error = error_from_log(log_text) or f"exit code {returncode}"
    intervals = read_metrics(run_dir / "metrics.jsonl")
    first, last = plan.measured_steps
    measured = [r for r in intervals if first <= r["step"] <= last]
    if error is None and len(measured) < plan.measure_intervals:
        error = f"only {len(measured)} of {plan.measure_intervals} measured intervals were logged"
    config_path = run_dir / "config.json"
    trace = run_dir / "profile" / "trace-rank0.json"
    checkpoint = checkpoint_meta(run_dir / "checkpoints")
    for bulky in ("checkpoints", "exports", "export"):  # engine checkpoints of SD 1.5 are gigabytes
        _remove(run_dir / bulky)
    return {
        "name": point.name, "point": dataclasses.asdict(point),
        "status": status if status != "ok" else ("failed" if error else "ok"), "memory": memory.record(),
        "error": error, "returncode": returncode, "command": shlex.join(command), "run_dir": str(run_dir),
        "wall_s": round(wall_s, 1), "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "measured_steps": [first, last], "metrics": summarise(measured, plan.num_gpus) if measured else {},
        "intervals": intervals, "config": json.loads(config_path.read_text()) if config_path.exists() else None,
        "profile_trace": str(trace) if trace.exists() else None, "checkpoint": checkpoint,
    }


def _end_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # nothing left in it
        pass


def _oom_killed(log_text: str, returncode: int | None) -> bool:
    """DeepSpeed's launcher reports a rank the kernel killed as exit code -9 (SIGKILL)."""
    return returncode in (-9, 137) or bool(re.search(r"exits with return code = -9\b", log_text))


def checkpoint_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """Size (MiB) and save time (s) of the point's newest committed checkpoint, from its meta.json."""
    metas = sorted(ckpt_dir.glob("step-*/meta.json"))
    if not metas:
        return None
    meta = json.loads(metas[-1].read_text())
    return {"mib": round(meta["bytes"] / 2 ** 20, 2), "save_s": meta["save_s"]}


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_from_log(text: str) -> str | None:
    """The line that says why a run failed: the trainer's one-sentence error or the last exception."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in text.splitlines()]
    for pattern in (r"^train\.py: (config )?error: ", r"OutOfMemoryError|out of memory",
                    r"^[\w.]*(Error|Exception)\b.*"):
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1][:500]
    return None


def summarise(rows: list[dict[str, Any]], world_size: int) -> dict[str, float | None]:
    """Measured intervals -> one figure per metric.

    Intervals have the same number of steps, so rates (images/s, TFLOP/s, MFU, HFU) and the data-wait
    share are time-weighted means (total work over total time); memory is the peak of the peaks.
    """
    times = [r["step_time_s"] for r in rows]
    total = sum(times)

    def weighted(key: str) -> float | None:
        values = [r.get(key) for r in rows]
        if any(v is None for v in values):
            return None
        return sum(v * t for v, t in zip(values, times)) / total

    def peak(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return max(values) if values else None

    ips = [r["images_per_s"] for r in rows]
    out = {"images_per_s": weighted("images_per_s"), "images_per_s_min": min(ips), "images_per_s_max": max(ips),
           "step_time_s": total / len(rows), "tflops_per_device": weighted("tflops_per_device"),
           "hardware_tflops_per_device": weighted("hardware_tflops_per_device"), "mfu": weighted("mfu"),
           "hfu": weighted("hfu"), "data_wait_share": weighted("data_wait_share"),
           "peak_mem_alloc_gib": peak("peak_mem_alloc_gib"), "peak_mem_reserved_gib": peak("peak_mem_reserved_gib"),
           "cpu_max_rss_gib": peak("cpu_max_rss_gib"), "loss": rows[-1].get("loss")}
    if out["tflops_per_device"] is not None and out["images_per_s"]:  # the FLOPs the meter counted
        out["model_gflop_per_image"] = out["tflops_per_device"] * 1e3 * world_size / out["images_per_s"]
    return out


# ---- data and model -----------------------------------------------------------------------------
def prepare_inputs(arch: str, plan: Plan, need_latents: bool, env: dict[str, str]) -> None:
    """Makes the random-weight model, the synthetic image shards and the latent shards when absent."""
    cli = [sys.executable, "-m", "defect_ds.cli"]
    if not (Path(plan.model_dir) / "model_index.json").exists():
        _run([*cli, "make-tiny-model", plan.model_dir, "--arch", arch], env)
    if not (Path(plan.images_dir) / "manifest.json").exists():
        _run([*cli, "prepare", "synthetic", plan.images_dir, "--resolution-px", str(plan.resolution_px),
              "--no-progress"], env)
    if need_latents and not (Path(plan.latents_dir) / "manifest.json").exists():
        _run([*cli, "prepare", "latents", plan.images_dir, plan.latents_dir, "--pretrained", plan.model_dir,
              "--resolution-px", str(plan.resolution_px), "--no-progress"], env)


def _run(command: list[str], env: dict[str, str]) -> None:
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)


# ---- the environment ----------------------------------------------------------------------------
def environment(num_gpus: int, cuda: bool, env: dict[str, str]) -> dict[str, Any]:
    """Device, library versions and host facts for the report."""
    info: dict[str, Any] = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                            "host_cores": len(os.sched_getaffinity(0)), "processes": num_gpus,
                            "accelerator": "cuda" if cuda else "cpu"}
    for lib in LIBRARIES:
        try:
            info[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            info[lib] = None
    if cuda:  # asked in a child process: a CUDA context here would take memory from the points
        probe = ("import torch; p = torch.cuda.get_device_properties(0); "
                 "print(torch.cuda.get_device_name(0)); print(p.total_memory / 2**30); print(torch.version.cuda)")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        name, mem, cuda_version = out.stdout.strip().splitlines()[-3:]
        info.update(device=name, device_memory_gib=round(float(mem), 1), cuda=cuda_version)
    else:
        info["device"] = cpu_name()
        threads = max(1, info["host_cores"] // num_gpus)  # what each rank gets (train/distributed.py)
        probe = f"import json; from defect_ds.perf.cpu_peak import cpu_peaks; print(json.dumps(cpu_peaks(1.0, {threads})))"
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True,
                             cwd=ROOT)
        info["cpu_peak_tflops"] = {**json.loads(out.stdout.strip().splitlines()[-1]), "threads": threads}
    info["peak_tflops"] = peak_tflops(info["device"]) if cuda else None
    return info


# ---- the command --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="tiny",
                   help="tiny (CPU) or sd15 (random-weight SD 1.5, 512 px; made if absent)")
    p.add_argument("--zero", default="2", help="ZeRO stages: 0 (plain data parallelism), 1, 2, 3, 3o (ZeRO-3 with "
                   "CPU offload), comma-separated")
    p.add_argument("--accum", default="1", help="gradient accumulation steps, comma-separated")
    p.add_argument("--micro-batch", default="4", help="micro batch sizes per rank, comma-separated")
    p.add_argument("--checkpointing", default="on", help="activation checkpointing: on, off or on,off")
    p.add_argument("--latents", default="off", help="precomputed latents: off, on or off,on")
    p.add_argument("--unet-mode", default="lora", help="what of the UNet trains: lora, full or lora,full")
    p.add_argument("--lora-rank", default="0", help="LoRA ranks, comma-separated (0: the run config's)")
    p.add_argument("--global-batch", type=int, default=0,
                   help="keep only the micro batch x accumulation pairs giving this many images per step "
                   "(with --grid product: accumulation at a fixed global batch)")
    p.add_argument("--grid", choices=("product", "around-base"), default="product",
                   help="every combination, or the base (first values) and one axis changed at a time")
    p.add_argument("--model", help="diffusers model folder (default work/tiny-sd or work/sd15)")
    p.add_argument("--data", help="image shards; synthetic ones are made if absent "
                   "(default work/data/synthetic or work/data/synthetic-512)")
    p.add_argument("--latents-data", help="latent shards; made from --data if absent (default WORK_DIR/latents-RESpx)")
    p.add_argument("--resolution-px", type=int, help="training resolution (default 64 tiny, 512 sd15)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="train.precision (auto: bf16 on GPUs and CPUs with native bf16, else fp32)")
    p.add_argument("--num-gpus", type=int, help="processes per point (default: the GPU count, 2 on the CPU)")
    p.add_argument("--config", default="configs/default.toml", help="run config every point starts from")
    p.add_argument("--interval-steps", type=int, default=5, help="optimizer steps per logged interval")
    p.add_argument("--warmup-intervals", type=int, default=1, help="intervals left out of the measurement")
    p.add_argument("--measure-intervals", type=int, default=2, help="intervals measured")
    p.add_argument("--timeout-s", type=int, default=1800, help="a point running longer is recorded as failed")
    p.add_argument("--memory-reserve-gib", type=float, default=1.5,
                   help="a point that would leave less memory free is stopped and recorded as does not fit")
    p.add_argument("--profile-point", help="point name (or index) that gets one extra, unmeasured interval "
                   "with a torch profiler trace")
    p.add_argument("--work-dir", help="run directories go under it (default work/bench/ARCH)")
    p.add_argument("--out", help="results path without suffix (default benchmarks/results/sweep-{cpu|gpu}-DATE)")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a train.py setting for every point, e.g. model.channels_last=true (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the points and their commands, run nothing")


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed and memory sweep: ZeRO stage x accumulation x micro batch x ...",
                       description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, command_line: str | None = None) -> int:
    """Runs the sweep; returns 0 if every point succeeded, 1 otherwise."""
    import torch

    extra = ["--" + o.removeprefix("--") for o in args.override]
    command_line = command_line or shlex.join(["defect-ds", *sys.argv[1:]])
    cuda = torch.cuda.is_available()
    model_dir, images_dir, resolution = ARCH_DEFAULTS[args.arch]
    work_dir = args.work_dir or f"work/bench/{args.arch}"
    plan = Plan(config=args.config, model_dir=args.model or model_dir, images_dir=args.data or images_dir,
                latents_dir=args.latents_data or f"{work_dir}/latents-{args.resolution_px or resolution}px",
                resolution_px=args.resolution_px or resolution,
                precision=args.precision, num_gpus=args.num_gpus or (torch.cuda.device_count() if cuda else 2),
                interval_steps=args.interval_steps, warmup_intervals=args.warmup_intervals,
                measure_intervals=args.measure_intervals, work_dir=work_dir, extra_overrides=extra,
                timeout_s=args.timeout_s, memory_reserve_gib=args.memory_reserve_gib)
    if min(plan.interval_steps, plan.measure_intervals, plan.num_gpus) < 1 or plan.warmup_intervals < 0:
        raise ValueError("--interval-steps, --measure-intervals and --num-gpus must be 1 or more and "
                         "--warmup-intervals 0 or more.")
    points = expand_grid(parse_axes(args.zero, args.accum, args.micro_batch, args.checkpointing, args.latents,
                                    args.unet_mode, args.lora_rank), args.grid)
    if args.global_batch:  # accumulation at a fixed global batch: keep the pairs that multiply to it
        points = at_global_batch(points, args.global_batch, plan.num_gpus)
    profiled = _find_point(points, args.profile_point) if args.profile_point else None
    for point in points:  # a bad override fails here, in the first second, not in point 7
        load_config(plan.config, point_overrides(point, plan, point == profiled))
    if args.dry_run:
        for point in points:
            print(point.name, "\n   ", shlex.join(launch_command(point, plan, point == profiled)))
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    prepare_inputs(args.arch, plan, any(p.latents for p in points), env)
    info = environment(plan.num_gpus, cuda, env)
    info.update(command=command_line, arch=args.arch, grid=args.grid, plan=dataclasses.asdict(plan),
                engine_configs={z: json.loads((ROOT / path).read_text()) for z, path in ZERO_CONFIGS.items()
                                if any(p.zero == z for p in points)})
    out = Path(args.out or f"benchmarks/results/sweep-{'gpu' if cuda else 'cpu'}-{info['date']}")
    results: list[dict[str, Any]] = []
    for i, point in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {point.name}", flush=True)
        result = run_point(point, plan, env, profile=point == profiled)
        results.append(result)
        m = result["metrics"]
        print(f"    {result['status']}: " + (result["error"] or f"{m['images_per_s']:.2f} images/s, "
                                             f"step {m['step_time_s']:.3f} s") + f" ({result['wall_s']} s)",
              flush=True)
        write_results(results, info, out)  # after every point: a cut-off sweep keeps what it measured
    print(f"wrote {out}.md, {out}.json, {out}.png")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _find_point(points: list[Point], key: str) -> Point:
    if key.isdigit() and int(key) < len(points):
        return points[int(key)]
    for point in points:
        if point.name == key:
            return point
    raise ValueError(f"--profile-point {key!r} is not a point of this sweep; use an index or one of: "
                     f"{', '.join(p.name for p in points)}.")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return run(args, command_line=shlex.join([*shlex.split(prog or "python -m defect_ds.perf.sweep"), *argv]))
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
