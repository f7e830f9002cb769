"""Process group, device and the DeepSpeed config: batch arithmetic computed once and injected.

Works under the `deepspeed` launcher (one node or a hostfile), under `torchrun`, and as plain
`python train.py` (a one-process group on a free local port).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from defect_ds.config import ConfigError, OptimizerConfig, TrainConfig
from defect_ds.utils.net import free_port

# Keys the typed config owns; a DeepSpeed file may repeat them only with the same values.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
SHM_DIR = Path("/dev/shm")  # where shm_open puts its files on Linux


class MasterPortInUse(RuntimeError):
    """Rank 0 could not listen on the master port; the message is one sentence for the user."""


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Initialises torch.distributed through DeepSpeed (NCCL on GPUs, gloo on the CPU); a collective
    that waits longer than `timeout_s` raises instead of hanging."""
    import datetime

    if "RANK" not in os.environ:  # plain `python train.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        _share_cpu_cores()
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        port = os.environ["MASTER_PORT"]
        raise MasterPortInUse(f"The master port {port} on {os.environ['MASTER_ADDR']} is in use by another launch "
                              f"or program; give this launch another one: deepspeed --master_port {free_port()} "
                              "... (MASTER_PORT for launch/*.sh, --master_port for torchrun).") from None
    remove_shm_buffer()
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), device)


def shm_buffer_path(rank: int, port: str | int, addr: str = "127.0.0.1") -> Path:
    """The shared-memory file DeepSpeed's CPU communication backend makes for `rank` of the launch on
    addr:port when every rank is on one node (deepspeed/ops/csrc/cpu/comm/shm.cpp); 69 MB, never removed."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def shm_buffers(port: str | int) -> list[Path]:
    """This user's DeepSpeed shared-memory buffers of launches on `port`, any address, any rank."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_[0-9]*"))


def remove_shm_buffer() -> None:
    """Removes the name of this rank's DeepSpeed shared-memory buffer once every rank has mapped every
    buffer: the mappings live on and the memory goes back when the last rank ends, however it ends.
    DeepSpeed never unlinks them, so each launch under `deepspeed` on one node left one file per rank."""
    torch.distributed.barrier()  # each rank has opened the others' buffers inside init_distributed
    try:
        shm_buffer_path(torch.distributed.get_rank(), os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]).unlink(
            missing_ok=True)
    except (OSError, KeyError):  # no /dev/shm, no such variables: nothing of ours to remove
        pass


def from_rank0(value):
    """Rank 0's value on every rank. Decisions read from files (resume, skip a save, skip a sample
    grid) must agree: a rank that saw the files differently, mid-write or on a slow network
    filesystem, would take another branch and wait forever in a collective."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# What gloo and NCCL say when the process on the other end of a collective is gone or never answers.
PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out",
                   "Timed out", "NCCL communicator was aborted", "ProcessGroupNCCL", "ProcessGroupGloo")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank stopped (its own error is its to report)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return any(sign in str(error) for sign in PEER_LOST_SIGNS)


def _share_cpu_cores() -> None:
    """Gives each CPU rank of this node its share of the cores. Ranks that each start one thread per
    core oversubscribe them, and spinning thread pools then make every small op thousands of times
    slower (measured here: a 256x32 linear took 26 us with 1 thread, 6.9 ms with 2 on 2 busy cores).
    OMP_NUM_THREADS, when set, is left to decide."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def build_ds_config(path: str | Path, train: TrainConfig, optim: OptimizerConfig, world_size: int) -> dict:
    """Reads the engine settings and injects the batch arithmetic and clipping of the typed config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.ds_config={str(path)!r} does not exist: pick a file in ds_configs/.")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config={str(path)!r} is not valid JSON ({e}).") from None
    global_batch = train.micro_batch_size * train.grad_accum_steps * world_size
    if train.global_batch_size and train.global_batch_size != global_batch:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} contradicts micro batch "
                          f"{train.micro_batch_size} x accumulation {train.grad_accum_steps} x world size "
                          f"{world_size} = {global_batch}: set it to {global_batch} or 0.")
    wanted = dict(zip(BATCH_KEYS, (train.micro_batch_size, train.grad_accum_steps, global_batch)))
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{path} sets {key}={ds[key]} but the run config gives {value} (micro batch x "
                              f"accumulation x world size); remove {key} from {path}, the trainer injects it.")
    ds.update(wanted)
    if "gradient_clipping" in ds and ds["gradient_clipping"] != optim.grad_clip:
        raise ConfigError(f"{path} sets gradient_clipping={ds['gradient_clipping']} but optimizer.grad_clip is "
                          f"{optim.grad_clip}; remove gradient_clipping from {path} and set optimizer.grad_clip.")
    ds["gradient_clipping"] = optim.grad_clip
    for key in ("optimizer", "scheduler", "fp16", "bf16"):
        if key in ds:
            raise ConfigError(f"{path} sets {key!r}; the trainer builds the optimizer, schedule and precision "
                              "from the run config, so remove it.")
    return ds


def uses_offload(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
