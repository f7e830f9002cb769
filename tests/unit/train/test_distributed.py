from pathlib import Path

import pytest

from defect_ds.config import ConfigError, OptimizerConfig, TrainConfig
from defect_ds.train.distributed import build_ds_config, zero_stage

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name, stage", [("zero0.json", 0), ("zero1.json", 1), ("zero2.json", 2), ("zero3.json", 3),
                                         ("zero3_offload.json", 3)])
def test_shipped_ds_configs_get_batch_arithmetic_injected(name, stage):
    ds = build_ds_config(ROOT / "ds_configs" / name, TrainConfig(micro_batch_size=3, grad_accum_steps=2),
                         OptimizerConfig(grad_clip=0.5), world_size=4)
    assert zero_stage(ds) == stage
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5


def test_contradicting_ds_file_is_an_error(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"train_batch_size": 16, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="train_batch_size=16 but the run config gives 8"):
        build_ds_config(f, TrainConfig(micro_batch_size=4, grad_accum_steps=1), OptimizerConfig(), 2)
    f.write_text('{"train_batch_size": 8}')
    assert build_ds_config(f, TrainConfig(micro_batch_size=4), OptimizerConfig(), 2)["train_batch_size"] == 8


def test_global_batch_size_must_match():
    with pytest.raises(ConfigError, match="train.global_batch_size=10 contradicts"):
        build_ds_config(ROOT / "ds_configs/zero2.json", TrainConfig(micro_batch_size=4, global_batch_size=10),
                        OptimizerConfig(), 2)


def test_ds_file_clipping_that_contradicts_the_run_config_is_an_error(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"gradient_clipping": 5.0}')
    with pytest.raises(ConfigError, match="gradient_clipping=5.0 but optimizer.grad_clip is 1.0"):
        build_ds_config(f, TrainConfig(), OptimizerConfig(grad_clip=1.0), 1)
    f.write_text('{"gradient_clipping": 1.0}')
    assert build_ds_config(f, TrainConfig(), OptimizerConfig(grad_clip=1.0), 1)["gradient_clipping"] == 1.0


def test_train_resume_flag_is_the_checkpoint_resume_setting():
    import sys

    sys.path.insert(0, str(ROOT))
    from train import parse_args

    config, overrides = parse_args(["--config", "c.toml", "--checkpoint.resume=", "--resume", "latest"])
    assert config == "c.toml" and overrides[-1] == "--checkpoint.resume=latest"


def test_a_rank_removes_its_own_shm_buffer_of_its_own_launch_and_no_other(tmp_path, monkeypatch):
    """DeepSpeed's CPU backend leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB)."""
    import torch

    from defect_ds.train import distributed

    monkeypatch.setattr(distributed, "SHM_DIR", tmp_path)
    mine = distributed.shm_buffer_path(1, 29511)
    others = [distributed.shm_buffer_path(0, 29511), distributed.shm_buffer_path(1, 29512),
              distributed.shm_buffer_path(1, 29511, "10.0.0.2")]
    for path in (mine, *others):
        path.touch()
    assert distributed.shm_buffers(29511) == sorted([mine, others[0], others[2]])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)  # the other ranks have mapped it
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    distributed.remove_shm_buffer()
    assert not mine.exists() and all(path.exists() for path in others)
    distributed.remove_shm_buffer()  # a launch whose DeepSpeed made none: nothing to remove, no error
