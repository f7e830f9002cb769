"""The scaling model on paper: its arithmetic, its choice, its inputs from a real (tiny) architecture,
and its check against a sweep's measured memory."""
from __future__ import annotations

import pytest

from defect_ds.perf import scaling

P = 1_000_000_000
FULL = scaling.Workload("full", trainable=P, frozen_engine=0, frozen_outside=0, activation_bytes=1e9,
                        activation_bytes_ckpt=2e8, flops=3e12, flops_ckpt=4e12)
LORA = scaling.Workload("lora", trainable=P // 1000, frozen_engine=P, frozen_outside=0, activation_bytes=1e9,
                        activation_bytes_ckpt=2e8, flops=2e12, flops_ckpt=3e12)
A100 = scaling.DEVICES[0]


def test_each_stage_shards_more_of_the_training_states():
    per_rank = [scaling.state_bytes(s, P, 0, 8) / P for s in ("0", "1", "2", "3")]
    assert per_rank == [16.0, 8 + 12 / 8, 4 + 16 / 8, 16 / 8]
    assert scaling.state_bytes("0", P, 0, 8) == scaling.state_bytes("0", P, 0, 64)  # plain DP never shards
    # LoRA: only ZeRO-3 shards the frozen UNet inside the engine
    assert scaling.state_bytes("2", P // 1000, P, 8) > 2 * P > scaling.state_bytes("3", P // 1000, P, 8)


def test_stage_3_moves_half_again_as_much_and_pays_it_every_micro_batch():
    ring = 7 / 8
    assert scaling.comm_bytes_per_step(FULL, "0", 8, 1) == pytest.approx(2 * P * 2 * ring)
    stage_2, stage_3 = (scaling.comm_bytes_per_step(FULL, s, 8, 1) for s in ("2", "3"))
    assert stage_3 == pytest.approx(1.5 * stage_2)
    assert scaling.comm_bytes_per_step(FULL, "0", 8, 4) == scaling.comm_bytes_per_step(FULL, "0", 8, 1)
    assert scaling.comm_bytes_per_step(FULL, "3", 8, 4) == pytest.approx(4 * stage_3)
    assert scaling.comm_bytes_per_step(FULL, "2", 8, 4) == pytest.approx(5 * P * 2 * ring)
    assert scaling.comm_bytes_per_step(FULL, "0", 1, 1) == 0
    # LoRA under ZeRO-3 gathers the frozen UNet too: far more than its adapters' gradients
    assert scaling.comm_bytes_per_step(LORA, "3", 8, 1) > 1000 * scaling.comm_bytes_per_step(LORA, "2", 8, 1)


def test_rings_inside_a_node_use_nvlink_and_across_nodes_infiniband():
    assert scaling.link_gbps(A100, 8) == A100.nvlink_gbps and scaling.link_gbps(A100, 16) == A100.ib_gbps
    inside, across = (scaling.predict(A100, FULL, "2", n, 1, 1, False) for n in (8, 16))
    assert across.comm_s > 5 * inside.comm_s and across.compute_s == inside.compute_s


def test_the_choice_fits_the_device_and_the_global_batch():
    for world in (8, 64, 512):
        p = scaling.choose(A100, FULL, world, 1024)
        assert p.fits and p.memory_gb <= scaling.HEADROOM * A100.memory_gb
        assert p.micro_batch * p.accum * world == 1024
    huge = scaling.Workload("huge", trainable=100 * P, frozen_engine=0, frozen_outside=0, activation_bytes=1e9,
                            activation_bytes_ckpt=1e8, flops=1e12, flops_ckpt=1e12)
    assert scaling.choose(A100, huge, 8, 64, stages=("0", "1", "2")) is None  # 100B x 4+ bytes on 80 GB
    assert scaling.choose(A100, huge, 512, 512).stage == "3"  # only full sharding fits it


def test_activations_of_a_real_unet_shrink_with_checkpointing_and_grow_with_resolution():
    small, large = scaling.workload("tiny", "full", 32), scaling.workload("tiny", "full", 64)
    assert 0 < small.activation_bytes_ckpt < small.activation_bytes
    # 4x the pixels: less than 4x the activations, since the text side of cross-attention does not grow
    assert 2 * small.activation_bytes < large.activation_bytes < 4 * small.activation_bytes
    assert large.flops_ckpt > large.flops > small.flops
    lora = scaling.workload("tiny", "lora", 32)
    assert lora.trainable < small.trainable and lora.frozen_engine == small.trainable


def test_attention_is_counted_as_the_fused_kernels_keep_it_not_as_a_matrix():
    import torch

    q = torch.empty(1, 2, 1024, 8, device="meta", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        scaling._fused_attention()(q, q, q)
    assert max(saved) == 1024 * 2 * 8 and 1024 * 1024 not in saved  # q, k, v, out; per-query statistics


def test_the_model_is_read_against_each_measured_point_of_a_sweep(tmp_path, load_script):
    tool = load_script("benchmarks/scaling_model.py")
    w = scaling.Workload("full", trainable=P, frozen_engine=0, frozen_outside=10**8, activation_bytes=2**30,
                         activation_bytes_ckpt=2**28, flops=1e12, flops_ckpt=1e12)
    point = {"zero": "2", "micro_batch": 1, "checkpointing": False, "unet_mode": "full", "lora_rank": 0}
    sweep = {"environment": {"processes": 2}, "points": [
        {"name": "z2_full", "point": point, "status": "ok", "config": {"train": {"precision": "bf16"}},
         "memory": {"rank_peak_rss_gib": [13.5, 14.0]}},
        {"name": "z0_full", "point": {**point, "zero": "0"}, "status": "does not fit",
         "config": {"train": {"precision": "bf16"}}, "memory": {"rank_peak_rss_gib": [11.0, 11.2]}}]}
    rows = [line for line in tool.sweep_check(sweep, {("full", 8): w}) if line.startswith("| `")]
    model_z2 = (P * (4 + 16 / 2) + 10**8 * 2 + scaling.buffer_bytes("2", P) + 2**30) / 2**30
    assert rows[0].split(" | ")[4:7] == ["14.00", f"{model_z2:.2f}", f"{14.0 - model_z2:+.2f}"]
    assert rows[1].endswith("| does not fit |")
