"""Fine-tunes Stable Diffusion on labelled defects: masked LoRA + textual inversion, DeepSpeed.

    deepspeed --num_gpus 2 train.py --config configs/default.toml --train.max_steps=100
    deepspeed --num_gpus 2 train.py --config configs/default.toml --resume latest   # continue a run
    python train.py --config configs/default.toml          # one process
    torchrun --nproc_per_node 2 train.py --config configs/default.toml
"""
from __future__ import annotations

import argparse
import os
import sys

from defect_ds.config import ConfigError, load_config


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=(
        "Any setting can be overridden as --section.field=value, e.g. --train.max_steps=10."))
    parser.add_argument("--config", help="TOML or JSON run config (defaults apply where it is silent)")
    parser.add_argument("--resume", metavar="TAG", help="continue from a committed checkpoint: latest or "
                        "step-NNNNNNN (the same as --checkpoint.resume=TAG)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the launcher
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")  # last: it wins over an earlier override
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_path, overrides)  # validated before anything heavy starts
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    from defect_ds.train.stop import StopRequest

    # first: a SIGTERM or Ctrl-C while the model loads ends the launch with one line, not a traceback
    stop = StopRequest(int(os.environ.get("RANK", "0")))
    # torch and the library load only once the config is valid: a bad setting fails in a second
    from defect_ds.train.preflight import check_run_inputs

    try:  # every input, before the process group, the model or the run dir: nothing is written on failure
        inputs = check_run_inputs(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, FileNotFoundError) as e:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # every rank reads the same files: one says it
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    from defect_ds.utils.quiet import quiet_cuda_probe

    quiet_cuda_probe()  # before DeepSpeed imports torch's extension helper
    from defect_ds.data.loader import BadShardError
    from defect_ds.data.sample import BadSampleError
    from defect_ds.train.checkpoint import CheckpointWriteError
    from defect_ds.train.distributed import MasterPortInUse, init_distributed, lost_peer
    from defect_ds.train.monitors import TrainingDiverged
    from defect_ds.train.run_lock import RunDirLocked, lock_for_launch
    from defect_ds.train.stop import Stopped
    from defect_ds.train.trainer import Trainer
    from defect_ds.utils.files import DiskFullError

    try:
        dist_info = init_distributed(cfg.train.collective_timeout_s)
    except MasterPortInUse as e:
        print(f"train.py: error: {e}", file=sys.stderr)  # only rank 0 binds the port
        return 2
    stop.rank = dist_info.rank
    stop.watch_launcher()
    run_lock = None
    trainer = Trainer(cfg, dist_info, inputs, stop)
    try:
        run_lock = lock_for_launch(cfg.logging.run_dir, dist_info.is_main)
        if run_lock is not None and run_lock.stale_holder:
            print(f"train.py: took over {run_lock.path}, left by a launch that has ended ({run_lock.stale_holder}).",
                  file=sys.stderr)
        trainer.setup()
        trainer.train()
    except RunDirLocked as e:  # every rank has rank 0's verdict: one says it
        if dist_info.is_main:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if dist_info.is_main:
            print(f"train.py: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, FileNotFoundError, TrainingDiverged, BadSampleError, BadShardError,
            CheckpointWriteError, DiskFullError) as e:
        # one rank's error ends this process; the launcher then stops the others, and a rank on
        # another node waiting in a collective gives up after train.collective_timeout_s
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        signalled = stop.lost_peer_message()  # a peer that a second signal ended at once
        if signalled:
            print(f"train.py: {signalled}", file=sys.stderr)
            return stop.exit_code
        # the rank that failed printed its own sentence; this one only lost its connection to it
        print(f"train.py: rank {dist_info.rank} stopped: another rank failed and its error is above.",
              file=sys.stderr)
        return 1
    finally:
        shutdown()
        if run_lock is not None:
            run_lock.release()
    return 0


def shutdown() -> None:
    """Leaves the process group; after a peer died that can fail too, and is not news."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:
            pass


if __name__ == "__main__":
    sys.exit(main())
