"""The benchmark sweep: grid expansion, per-point settings, summaries and the written results.

Fabricated point results everywhere except the one `slow` test, which runs a single tiny point.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
from PIL import Image

from defect_ds.perf import sweep
from defect_ds.perf.sweep_report import config_diff, write_results
from defect_ds.config import ConfigError, load_config

AXES = dict(zero="2,3,3o", accum="1,2", micro_batch="4,8", checkpointing="on,off", latents="off,on")


def make_plan(tmp_path, **overrides) -> sweep.Plan:
    values = dict(config="configs/default.toml", model_dir="work/tiny-sd", images_dir="data/img",
                  latents_dir="data/lat", resolution_px=64, precision="fp32", num_gpus=2, interval_steps=4,
                  warmup_intervals=1, measure_intervals=2, work_dir=str(tmp_path / "runs"), extra_overrides=[])
    values.update(overrides)
    return sweep.Plan(**values)


def test_product_grid_holds_every_combination_once():
    points = sweep.expand_grid(sweep.parse_axes(**AXES), "product")
    assert len(points) == 3 * 2 * 2 * 2 * 2 == len(set(points)) == len({p.name for p in points})


def test_around_base_changes_one_axis_at_a_time():
    points = sweep.expand_grid(sweep.parse_axes(**AXES), "around-base")
    base = points[0]
    assert base == sweep.Point("2", 1, 4, True, False)
    assert len(points) == 1 + 2 + 1 + 1 + 1 + 1
    for point in points[1:]:
        changed = [f.name for f in dataclasses.fields(point) if getattr(point, f.name) != getattr(base, f.name)]
        assert len(changed) == 1, point


@pytest.mark.parametrize("field,value", [("zero", "2,4"), ("accum", "0"), ("micro_batch", "two"),
                                         ("checkpointing", "maybe"), ("latents", "")])
def test_bad_axis_values_are_refused_with_the_flag_named(field, value):
    with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
        sweep.parse_axes(**{**AXES, field: value})


def test_point_settings_resolve_to_a_valid_config(tmp_path):
    plan = make_plan(tmp_path, extra_overrides=["--model.channels_last=true"])
    point = sweep.Point("3o", 2, 8, False, True)
    cfg = load_config(plan.config, sweep.point_overrides(point, plan))
    assert cfg.train.ds_config == "ds_configs/zero3_offload.json"
    assert (cfg.train.grad_accum_steps, cfg.train.micro_batch_size) == (2, 8)
    assert not cfg.model.activation_checkpointing and cfg.model.channels_last
    assert cfg.data.train_shards == "data/lat" and cfg.data.resolution_px == 64
    assert cfg.train.max_steps == 12 and cfg.logging.log_every_steps == 4 and plan.measured_steps == (5, 12)
    assert cfg.checkpoint.every_steps == 0 and cfg.logging.sample_every_steps == 0
    assert cfg.logging.profile_at_step == 0
    assert cfg.logging.run_dir.endswith(point.name)


def test_a_profiled_point_gets_an_extra_interval_outside_the_measured_steps(tmp_path):
    plan = make_plan(tmp_path)
    cfg = load_config(plan.config, sweep.point_overrides(sweep.Point("2", 1, 4, True, False), plan, profile=True))
    first, last = plan.measured_steps
    assert cfg.logging.profile_at_step == last + 1
    assert cfg.train.max_steps == last + plan.interval_steps
    assert cfg.logging.profile_at_step + cfg.logging.profile_steps - 1 <= cfg.train.max_steps


def test_profiler_settings_are_validated():
    with pytest.raises(ConfigError, match="logging.profile_steps"):
        load_config(None, ["--logging.profile_steps=0"])
    with pytest.raises(ConfigError, match="logging.profile_at_step"):
        load_config(None, ["--logging.profile_at_step=-1"])


def test_summary_is_total_work_over_total_time():
    rows = [{"step": 8, "images_per_s": 8.0, "step_time_s": 1.0, "tflops_per_device": 2.0, "mfu": 0.2,
             "data_wait_share": 0.0, "peak_mem_alloc_gib": 3.0, "loss": 0.5},
            {"step": 12, "images_per_s": 2.0, "step_time_s": 4.0, "tflops_per_device": 0.5, "mfu": 0.05,
             "data_wait_share": 0.5, "peak_mem_alloc_gib": 5.0, "loss": 0.4}]
    m = sweep.summarise(rows, world_size=2)
    # equal samples per interval (8 and 2 images/s over 1 s and 4 s steps): 16 samples in 5 s
    assert m["images_per_s"] == pytest.approx(16 / 5)
    assert (m["images_per_s_min"], m["images_per_s_max"]) == (2.0, 8.0)
    assert m["tflops_per_device"] == pytest.approx((2.0 * 1 + 0.5 * 4) / 5)
    assert m["mfu"] == pytest.approx((0.2 + 0.05 * 4) / 5)
    assert m["data_wait_share"] == pytest.approx(0.4)
    assert m["peak_mem_alloc_gib"] == 5.0 and m["cpu_max_rss_gib"] is None and m["hfu"] is None
    assert m["step_time_s"] == pytest.approx(2.5)
    # TFLOP/s per device x devices / images/s
    assert m["model_gflop_per_image"] == pytest.approx(0.8e3 * 2 / 3.2)


@pytest.mark.parametrize("log,expected", [
    ("step 1\n[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\nKilling subprocess",
     "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"),
    ("train.py: error: data yields no full batch of 64 per rank; lower train.micro_batch_size or add data.\n"
     "[INFO] exits with return code = 2", "train.py: error: data yields no full batch"),
    ("Traceback (most recent call last):\n  File x\nRuntimeError: Error building extension 'cpu_adam'\n",
     "RuntimeError: Error building extension 'cpu_adam'"),
])
def test_the_failure_line_is_found_in_the_log(log, expected):
    assert sweep.error_from_log(log).startswith(expected)


def fabricated_results() -> tuple[list[dict], dict]:
    config = {"model": {"activation_checkpointing": True}, "train": {"ds_config": "ds_configs/zero2.json"}}
    ok = {"name": "z2_a1_mb4_ckpt_img", "point": dataclasses.asdict(sweep.Point("2", 1, 4, True, False)),
          "status": "ok", "error": None, "command": "deepspeed ...", "run_dir": "work/bench/x",
          "measured_steps": [5, 12], "load_avg_1min": [1.0, 1.2], "config": config, "profile_trace": "t.json",
          "metrics": {"images_per_s": 21.5, "images_per_s_min": 20.0, "images_per_s_max": 23.0,
                      "step_time_s": 1.49, "tflops_per_device": 150.0, "mfu": 0.152, "hfu": 0.18,
                      "data_wait_share": 0.01, "peak_mem_alloc_gib": 11.2, "peak_mem_reserved_gib": 12.9,
                      "model_gflop_per_image": 7.0}, "checkpoint": {"mib": 6.4, "save_s": 0.35}}
    failed = dict(ok, name="z3o_a1_mb4_ckpt_img", status="failed", metrics={}, profile_trace=None,
                  point=dataclasses.asdict(sweep.Point("3o", 1, 4, True, False)),
                  error="RuntimeError: Error building extension 'cpu_adam'",
                  config={"model": {"activation_checkpointing": True},
                          "train": {"ds_config": "ds_configs/zero3_offload.json"}})
    info = {"date": "2026-11-22", "python": "3.11.7", "host_cores": 16, "processes": 1, "accelerator": "cuda",
            "torch": "2.14.1", "deepspeed": "0.19.8", "diffusers": "0.42.1", "peft": "0.21.2",
            "device": "NVIDIA H100 80GB HBM3", "device_memory_gib": 79.2, "cuda": "13.0", "peak_tflops": 989.0,
            "command": "defect-ds bench --arch sd15", "arch": "sd15",
            "plan": {"resolution_px": 512, "interval_steps": 4, "warmup_intervals": 1, "measure_intervals": 2},
            "engine_configs": {"2": {"zero_optimization": {"stage": 2}}}}
    return [ok, failed], info


def table(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_results_are_written_as_json_markdown_and_png(tmp_path):
    results, info = fabricated_results()
    write_results(results, info, tmp_path / "sweep-gpu-2026-11-22")
    data = json.loads((tmp_path / "sweep-gpu-2026-11-22.json").read_text())
    assert data["environment"]["device"] == info["device"] and len(data["points"]) == 2
    md = (tmp_path / "sweep-gpu-2026-11-22.md").read_text()
    for text in ("NVIDIA H100 80GB HBM3", "torch 2.14.1", "deepspeed 0.19.8", "diffusers 0.42.1", "peft 0.21.2",
                 "`defect-ds bench --arch sd15`", "15.2%", "18.0%", "11.2 / 12.9", "3 + offload",
                 "**failed**: RuntimeError: Error building extension 'cpu_adam'", "Fastest: `z2_a1_mb4_ckpt_img`",
                 '`train.ds_config="ds_configs/zero3_offload.json"`', "t.json", "sweep-gpu-2026-11-22.png"):
        assert text in md, text
    ok, failed = table(md)
    assert (ok["images/s"], ok["MFU"], ok["global batch"], ok["ZeRO"]) == ("21.5", "15.2%", "4", "2")
    assert failed["images/s"] == "-" and failed["ZeRO"] == "3 + offload"
    assert (ok["ckpt MiB"], ok["ckpt save s"]) == ("6.4", "0.35")
    with Image.open(tmp_path / "sweep-gpu-2026-11-22.png") as image:
        assert image.size[0] > 500 and image.size[1] > 100


def test_without_a_peak_figure_mfu_is_left_blank(tmp_path):
    results, info = fabricated_results()
    info.update(accelerator="cpu", device="AMD EPYC", peak_tflops=None)
    results[0]["metrics"].update(mfu=None, hfu=None, peak_mem_alloc_gib=None, cpu_max_rss_gib=1.04)
    write_results(results[:1], info, tmp_path / "cpu")
    md = (tmp_path / "cpu.md").read_text()
    assert "MFU and HFU are not defined" in md and "peak RSS per rank GiB" in md and "| 1.04 |" in md  # older
    row = table(md)[0]
    assert row["MFU"] == row["HFU"] == "-" and row["TFLOP/s/dev"] == "150"


def test_a_dot_in_the_output_name_stays_part_of_it(tmp_path):
    results, info = fabricated_results()
    write_results(results[:1], info, tmp_path / "sweep-reserve-0.75-amx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sweep-reserve-0.75-amx.json", "sweep-reserve-0.75-amx.md", "sweep-reserve-0.75-amx.png"]


def test_config_diff_lists_only_changed_fields():
    base = {"train": {"micro_batch_size": 4, "seed": 0}, "model": {"activation_checkpointing": True}}
    other = {"train": {"micro_batch_size": 8, "seed": 0}, "model": {"activation_checkpointing": True}}
    assert config_diff(base, other) == {"train.micro_batch_size": 8}


def test_defect_ds_bench_is_registered_and_dry_runs(capsys):
    from defect_ds.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--zero", "2,3", "--grid", "around-base"])
    assert args.func is sweep.run
    assert main(["bench", "--zero", "2,3", "--latents", "off,on", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("deepspeed --num_gpus") == 4 and "z3_a1_mb4_ckpt_lat" in out
    assert main(["bench", "--override", "train.nonsense=1", "--dry-run"]) == 2


@pytest.mark.slow
def test_one_tiny_point_runs_under_deepspeed_and_is_measured(tiny_model_dir, make_synthetic, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    data = make_synthetic(tmp_path / "data", resolution_px=64, good_per_category=2)
    plan = make_plan(tmp_path, model_dir=str(tiny_model_dir), images_dir=str(data), interval_steps=1,
                     extra_overrides=["--data.num_workers=0"], timeout_s=600)
    result = sweep.run_point(sweep.Point("2", 1, 2, True, False), plan, env, profile=True)
    assert result["status"] == "ok", result["error"]
    assert [r["step"] for r in result["intervals"]] == [1, 2, 3, 4]  # warm-up, 2 measured, profiled
    assert result["metrics"]["images_per_s"] > 0 and result["metrics"]["tflops_per_device"] > 0
    assert result["config"]["train"]["micro_batch_size"] == 2
    trace = json.loads(open(result["profile_trace"]).read())
    assert any("ProfilerStep" in e.get("name", "") or e.get("ph") == "X" for e in trace["traceEvents"])
    assert not (tmp_path / "runs" / result["name"] / "checkpoints").exists()
    assert result["checkpoint"]["mib"] > 0 and result["checkpoint"]["save_s"] > 0  # read before removal
    assert all(r["mfu"] > 0 for r in result["intervals"])  # the CPU's measured peak gives an MFU
    ranks = result["memory"]["rank_peak_rss_gib"]  # both ranks' high-water marks, read while they ran
    assert len(ranks) == 2 and min(ranks) > 0.1 and not result["memory"]["stopped"]


def test_unet_mode_and_lora_rank_are_axes_and_full_points_ignore_the_rank(tmp_path):
    axes = sweep.parse_axes("0,3", "1", "1", "on", "off", unet_mode="lora,full", lora_rank="8,64")
    points = sweep.expand_grid(axes, "product")
    assert sorted(p.name for p in points) == sorted([
        "z0_a1_mb1_ckpt_img_r8", "z0_a1_mb1_ckpt_img_r64", "z0_a1_mb1_ckpt_img_full",
        "z3_a1_mb1_ckpt_img_r8", "z3_a1_mb1_ckpt_img_r64", "z3_a1_mb1_ckpt_img_full"])
    plan = make_plan(tmp_path)
    full = load_config(plan.config, sweep.point_overrides(sweep.Point("0", 1, 1, True, False, "full"), plan))
    assert full.model.unet_mode == "full" and full.train.ds_config == "ds_configs/zero0.json"
    lora = load_config(plan.config, sweep.point_overrides(sweep.Point("1", 1, 1, True, False, "lora", 64), plan))
    assert (lora.model.unet_mode, lora.lora.rank, lora.lora.alpha) == ("lora", 64, 64.0)
    assert sweep.Point("2", 1, 4, True, False).name == "z2_a1_mb4_ckpt_img"  # older results keep their names


@pytest.mark.parametrize("field,value", [("unet_mode", "frozen"), ("lora_rank", "-1")])
def test_bad_unet_mode_and_rank_are_refused(field, value):
    with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
        sweep.parse_axes(**{**AXES, field: value})


def test_ranks_are_told_from_the_runner_by_their_command_line():
    assert sweep.rank_of(["python", "-u", "train.py", "--local_rank=1", "--config", "c.toml"]) == 1
    assert sweep.rank_of(["python", "train.py", "--local_rank", "0"]) == 0
    assert sweep.rank_of(["python", "-m", "deepspeed.launcher.launch", "--world_info=x", "train.py"]) is None
    assert sweep.rank_of(["deepspeed", "--num_gpus", "2", "train.py", "--config", "c.toml"]) is None


def test_a_launch_that_would_exhaust_memory_is_stopped_and_its_ranks_peaks_are_kept():
    """A stand-in rank holds 64 MiB; the machine reports less free memory than the reserve: the watch kills
    the whole tree (a runner and its rank) and keeps what the rank reached."""
    import subprocess
    import sys

    rank = ("import sys, time; block = bytearray(64 * 2 ** 20); block[::4096] = b'x' * len(block[::4096]); "
            "print('ready', flush=True); time.sleep(60)")
    runner = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, "
                               f"'-c', {rank!r}, 'train.py', '--local_rank=0'])"], stdout=subprocess.PIPE)
    free = [8.0]
    try:
        assert runner.stdout.readline().strip() == b"ready"
        watch = sweep.MemoryWatch(runner.pid, reserve_gib=1.0, available=lambda: free[0])
        watch.read()
        assert not watch.stopped and watch.rank_peak_gib[0] >= 64 / 1024
        free[0] = 0.5
        watch.read()
        assert watch.stopped and runner.wait(timeout=10) == -9
    finally:
        runner.kill()
    record = watch.record()
    assert record["stopped"] and record["min_available_gib"] == 0.5 and record["rank_peak_rss_gib"][0] >= 0.06
    assert watch.does_not_fit().startswith("the ranks held 0.1 GiB together")


def test_points_that_do_not_fit_are_marked_and_every_ranks_peak_is_shown(tmp_path):
    results, info = fabricated_results()
    info.update(accelerator="cpu", device="Intel Xeon", peak_tflops=None,
                plan={**info["plan"], "memory_reserve_gib": 1.5})
    point = dataclasses.asdict(sweep.Point("0", 1, 1, True, False, "full"))
    full = dict(results[1], name="z0_a1_mb1_ckpt_img_full", point=point, status="does not fit",
                error="the ranks held 21.0 GiB together (peak per rank 10.5, 10.5 GiB) and 1.4 GiB "
                      "was left free; stopped before the kernel's OOM killer",
                memory={"rank_peak_rss_gib": [10.5, 10.5]})
    ok = dict(results[0], memory={"rank_peak_rss_gib": [3.25, 3.5]})
    write_results([ok, full], info, tmp_path / "cpu")
    md = (tmp_path / "cpu.md").read_text()
    ok_row, full_row = table(md)
    assert ok_row["peak RSS per rank GiB"] == "3.25 / 3.5" and ok_row["UNet"] == "LoRA"
    assert full_row["peak RSS per rank GiB"] == "10.5 / 10.5" and full_row["UNet"] == "full"
    assert full_row["ZeRO"] == "0 (plain DP)" and full_row["status"].startswith("**does not fit**: the ranks held")
    assert "less than 1.5 GiB" in md and "## Points that failed or did not fit" in md


def test_a_fixed_global_batch_keeps_the_pairs_that_multiply_to_it():
    points = sweep.expand_grid(sweep.parse_axes("2", "1,2,4,8", "1,2,4,8", "off", "off"), "product")
    kept = sweep.at_global_batch(points, 16, 2)
    assert sorted((p.micro_batch, p.accum) for p in kept) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    with pytest.raises(ValueError, match="--global-batch 3"):
        sweep.at_global_batch(points, 3, 2)
