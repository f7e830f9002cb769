"""CPU integration runs: train.py under the deepspeed launcher with two processes and the tiny model."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

import pytest
import torch
from safetensors.torch import load_file

from defect_ds.train.distributed import shm_buffers
from defect_ds.utils import net
from defect_ds.utils.device import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data_dir(make_synthetic, tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", resolution_px=64, per_defect=4,
                          good_per_category=2)


def common_args(model: Path, data: Path, run_dir: Path, **overrides) -> list[str]:
    settings = {"model.pretrained_dir": model, "data.train_shards": data, "logging.run_dir": run_dir,
                "data.resolution_px": 64, "data.num_workers": 0, "train.micro_batch_size": 2,
                "logging.log_every_steps": 1, "logging.sample_every_steps": 0, "logging.progress_bar": "false",
                "logging.tensorboard": "false", "train.precision": "fp32", "optimizer.warmup_steps": 2,
                "optimizer.learning_rate": 1e-3}
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--{k}={v}" for k, v in settings.items()]


def deepspeed_train(args: list[str], nprocs: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    port = net.free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(port), str(ROOT / "train.py"),
           *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not shm_buffers(port)  # DeepSpeed's shared-memory buffers of this launch went with it
    return result


SHM_CHECK = """
import os, sys
sys.path.insert(0, {root!r})
import deepspeed
from deepspeed.ops import __compatible_ops__
from defect_ds.train.distributed import init_distributed, shm_buffer_path

made = []
_init = deepspeed.init_distributed
def init(*args, **kwargs):
    _init(*args, **kwargs)
    made.append(shm_buffer_path(0, os.environ["MASTER_PORT"]).exists())
deepspeed.init_distributed = init
init_distributed()
left = shm_buffer_path(0, os.environ["MASTER_PORT"]).exists()
print("RESULT", __compatible_ops__.get("deepspeed_shm_comm"), made, left)
"""


def test_deepspeed_makes_the_shm_buffer_train_py_removes(tmp_path):
    """DeepSpeed's CPU backend makes /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB) when
    every rank is on one node, as the launcher's LOCAL_SIZE says, and never removes it; init_distributed does."""
    script = tmp_path / "shm_check.py"
    script.write_text(SHM_CHECK.format(root=str(ROOT)))
    env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(net.free_port())}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if line.startswith("RESULT False"):
        pytest.skip("DeepSpeed's shared-memory op does not build on this CPU")
    assert line == "RESULT True [True] False"


def logged(result: subprocess.CompletedProcess) -> str:
    """A run's output with the log's line wrapping undone (it wraps at the terminal's width)."""
    return " ".join((result.stdout + result.stderr).split())


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_zero2_resume_matches_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    """fp32, fixed seed, accumulation 2: stopping after step 2 and resuming gives the same losses and weights."""
    steps = dict(train__max_steps=4, checkpoint__every_steps=2, train__ds_config="ds_configs/zero2.json",
                 train__grad_accum_steps=2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    deepspeed_train(common_args(tiny_model_dir, data_dir, whole, **steps))
    deepspeed_train(common_args(tiny_model_dir, data_dir, parts, **steps, train__stop_at_step=2))
    assert sorted(losses(parts)) == [1, 2]
    assert [p.name for p in (parts / "checkpoints").glob("step-*")] == ["step-0000002"]
    deepspeed_train([*common_args(tiny_model_dir, data_dir, parts, **steps), "--resume", "latest"])

    assert losses(parts) == losses(whole)  # identical floats, step for step
    a = load_file(whole / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(parts / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for token_file in (whole / "export" / "learned_embeds").glob("*.safetensors"):
        ea, eb = load_file(token_file), load_file(parts / "export" / "learned_embeds" / token_file.name)
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    done = sorted(p.name for p in (parts / "checkpoints").glob("step-*") if (p / "COMMITTED").exists())
    assert done == ["step-0000002", "step-0000004"]
    # lean: the checkpoint holds only what trains; the frozen base came from model.pretrained_dir
    module = torch.load(parts / "checkpoints" / "step-0000004" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    params = [k for k in module if k.endswith(("weight", "bias", "learned_vectors"))]
    assert params and all("lora_" in k or k.endswith("learned_vectors") for k in params)
    meta = json.loads((parts / "checkpoints" / "step-0000004" / "meta.json").read_text())
    assert meta["base_fingerprint"] and meta["trained_parameters"] == len(params)
    assert json.loads((parts / "config.json").read_text())["checkpoint"]["resume"] == "latest"


@pytest.fixture(scope="module")
def latent_dir(data_dir, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "synthetic"
    subprocess.run([sys.executable, "-m", "defect_ds.cli", "prepare", "latents", str(data_dir), str(out),
                    "--pretrained", str(tiny_model_dir), "--resolution-px", "64", "--device", "cpu", "--no-progress"],
                   check=True, env=_env(), capture_output=True)
    return out


def train_one_process(args: list[str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=_env(), capture_output=True,
                            text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_resume_on_latent_shards_matches_the_straight_run_whatever_the_worker_count(tiny_model_dir, latent_dir,
                                                                                     tmp_path):
    """The VAE posterior is sampled per sample from (seed, epoch, key): a run with 2 loader workers, stopped
    at step 3 and resumed, draws what the straight run without workers drew."""
    steps = dict(train__max_steps=6, checkpoint__every_steps=3)
    straight = tmp_path / "straight"
    train_one_process(common_args(tiny_model_dir, latent_dir, straight, **steps))  # data.num_workers=0
    assert sorted(losses(straight)) == [1, 2, 3, 4, 5, 6]
    parts = tmp_path / "parts"
    args = common_args(tiny_model_dir, latent_dir, parts, **steps, data__num_workers=2)
    train_one_process([*args, "--train.stop_at_step=3"])
    assert sorted(losses(parts)) == [1, 2, 3]
    train_one_process([*args, "--resume", "latest"])
    # identical floats: steps 1-3 show the worker count changes nothing, steps 4-6 that the resume is exact
    assert losses(parts) == losses(straight)


# The start of a script run under `deepspeed`: a Trainer of the run's config, set up (engine built).
TRAINER_SET_UP = """
import json, sys
import torch
sys.path.insert(0, {root!r})
import deepspeed
from defect_ds.config import load_config
from defect_ds.train.distributed import init_distributed
from defect_ds.train.trainer import Trainer
from train import parse_args

cfg = load_config(*parse_args(sys.argv[1:]))
info = init_distributed()
trainer = Trainer(cfg, info)
trainer.setup()
"""

ZERO3_CHECK = TRAINER_SET_UP + """
from defect_ds.model.components import load_components

model = trainer.engine.module
base = model.text_encoder.get_input_embeddings().base.weight
learned = model.text_encoder.get_input_embeddings().learned_vectors
with deepspeed.zero.GatheredParameters([learned]):
    before = learned.detach().clone()
trainer.train()
original = load_components(cfg.model).text_encoder.get_input_embeddings().weight
with deepspeed.zero.GatheredParameters([base, learned]):
    rows = original.shape[0]
    result = {{"partitioned": base.ds_tensor.numel() < base.numel(),
               "old_rows_identical": bool(torch.equal(base[:rows].float(), original.float())),
               "learned_changed": bool(not torch.equal(learned, before))}}
if info.rank == 0:
    json.dump(result, open(cfg.logging.run_dir + "/zero3_check.json", "w"))
"""


def test_zero3_trains_only_new_rows_and_exports_load_into_stock_pipeline(tiny_model_dir, data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "z3"
    script = tmp_path / "zero3_check.py"
    script.write_text(ZERO3_CHECK.format(root=str(ROOT)))
    args = common_args(tiny_model_dir, data_dir, run, train__max_steps=3, checkpoint__every_steps=0,
                       checkpoint__save_final="false",
                       train__ds_config="ds_configs/zero3.json", optimizer__learning_rate=5e-2,
                       textual_inversion__learning_rate=5e-1, optimizer__warmup_steps=0)
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(net.free_port()), str(script), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = json.loads((run / "zero3_check.json").read_text())
    assert not list((run / "checkpoints").glob("step-*"))  # every_steps=0 and save_final=false: none
    assert check == {"partitioned": True, "old_rows_identical": True, "learned_changed": True}

    export = run / "export"
    lora = load_file(export / "pytorch_lora_weights.safetensors")
    assert lora and all(v.numel() > 0 for v in lora.values())  # gathered, never empty
    assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items())
    embeds = sorted((export / "learned_embeds").glob("*.safetensors"))
    assert [p.stem for p in embeds] == ["sks_crack", "sks_scratch", "sks_spot"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a pill with sks_scratch"

    def render():
        return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipe.load_lora_weights(export)
    after_lora = render()
    pipe.load_textual_inversion([str(p) for p in embeds])
    assert "sks_scratch" in pipe.tokenizer.get_vocab()
    after_both = render()
    assert abs(after_lora - before).max() > 1e-3
    assert abs(after_both - after_lora).max() > 1e-3


def test_loss_falls_when_overfitting(tiny_model_dir, make_synthetic, tmp_path):
    data = make_synthetic(tmp_path / "one", resolution_px=64, per_defect=1, good_per_category=0, categories="pill",
                          val_fraction=0)
    run = tmp_path / "overfit"
    # the full UNet: a random-weight base leaves attention-only adapters too little to fit with
    args = common_args(tiny_model_dir, data, run, train__max_steps=80, checkpoint__every_steps=0,
                       model__unet_mode="full", optimizer__learning_rate=2e-3, optimizer__schedule="constant",
                       train__micro_batch_size=1, logging__log_every_steps=10, data__hflip="false")
    deepspeed_train(args)  # two processes, ZeRO-2
    curve = losses(run)
    assert curve[80] < 0.5 * curve[10], curve


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "nan"
    args = common_args(tiny_model_dir, data_dir, run, train__max_steps=6, checkpoint__every_steps=1,
                       optimizer__learning_rate=1e30, optimizer__warmup_steps=0,
                       optimizer__schedule="constant", optimizer__grad_clip=0)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=_env(), capture_output=True,
                            text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 2
    assert re.search(r"The (loss|trained weights) became NaN or infinite by step \d", result.stderr)
    done = [p for p in (run / "checkpoints").glob("step-*") if (p / "COMMITTED").exists()]
    assert done and f"{done[-1]} is kept" in result.stderr
    assert not (run / "export").exists()  # nothing exported from the diverged weights
    kept = load_file(run / "exports" / done[-1].name / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in kept.values())  # "good" means finite weights, too


def test_two_nodes_on_one_machine(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "two-nodes"
    args = common_args(tiny_model_dir, data_dir, run, train__max_steps=2, checkpoint__every_steps=0)
    env = {**_env(), "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_PORT": str(net.free_port())}
    result = subprocess.run([str(ROOT / "launch" / "two_nodes_local.sh"), "configs/default.toml", *args],
                            env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "nnodes=2" in result.stdout + result.stderr
    ranks = sorted(p.name for p in (run / "checkpoints" / "step-0000002").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(ranks) == 2  # one optimizer shard per node
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.skipif(not cpu_has_native_bf16() and not torch.cuda.is_available(),
                    reason="bf16 is emulated on CPUs without avx512_bf16 or AMX (a convolution ran 25x slower than "
                           "fp32 on an AVX2-only EPYC) and this run outlasts its 400 s limit there")
def test_torchrun_launch_bf16_with_samples_and_tensorboard(tiny_model_dir, data_dir, tmp_path):
    """torchrun, bf16 on the CPU, ZeRO-3: sample grids (frozen weights in bf16) and TensorBoard scalars."""
    run = tmp_path / "torchrun"
    args = common_args(tiny_model_dir, data_dir, run, train__max_steps=2, checkpoint__every_steps=0,
                       train__precision="bf16", train__ds_config="ds_configs/zero3.json",
                       logging__sample_every_steps=1, logging__sample_steps=2, logging__tensorboard="true",
                       logging__progress_bar="true")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(net.free_port()),
           str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2]
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step-0000001.png", "step-0000002.png"]
    from PIL import Image

    grid = Image.open(run / "samples" / grids[-1])
    assert grid.width > grid.height  # one image per defect token, side by side
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "images_per_s", "data_wait_share"} <= set(events.Tags()["scalars"])


def test_one_rank_failing_on_bad_data_ends_the_whole_run(tiny_model_dir, make_synthetic, tmp_path):
    """data.bad_sample_policy=fail: the rank that reads a corrupt shard stops, and so does the other."""
    data = make_synthetic(tmp_path / "data", resolution_px=64, per_defect=4, good_per_category=2,
                          shard_max_samples=10, val_fraction=0)
    shards = sorted(data.glob("train-*.tar"))
    assert len(shards) >= 2
    shards[0].write_bytes(shards[0].read_bytes()[:3000])  # truncated: only one rank reads it
    run = tmp_path / "fail"
    args = common_args(tiny_model_dir, data, run, train__max_steps=6, checkpoint__every_steps=0,
                       data__bad_sample_policy="fail", data__split_by="shard", train__collective_timeout_s=60)
    port = net.free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0 and not shm_buffers(port)
    error = next(line for line in result.stderr.splitlines() if line.startswith("train.py: error: "))
    assert "Cannot read" in error and str(shards[0]) in error  # one sentence naming the shard
    # the partner rank says in one line that another rank failed, with no traceback of the broken connection
    assert re.search(r"train.py: rank \d stopped: another rank failed and its error is above\.", result.stderr), \
        result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


# A full disk faked on rank 1's optimizer shard of step 2: torch.save writes part of the file and fails.
ENOSPC_WRAPPER = """
import errno, os, sys
sys.path.insert(0, {root!r})
import torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if "step-0000002" in str(f) and os.environ.get("RANK") == "1":
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return _save(obj, f, *args, **kwargs)
torch.save = save
import train
sys.exit(train.main())
"""


def test_disk_full_during_a_checkpoint_is_one_sentence_and_resumes_exactly(tiny_model_dir, data_dir, tmp_path):
    run = tmp_path / "full"
    script = tmp_path / "enospc.py"
    script.write_text(ENOSPC_WRAPPER.format(root=str(ROOT)))
    args = common_args(tiny_model_dir, data_dir, run, train__max_steps=3, checkpoint__every_steps=1)
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(net.free_port()), str(script), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    ckpts = run / "checkpoints"
    sentence = (f"train.py: error: No space left while saving step 2 in {ckpts}; the last committed checkpoint "
                "is step 1 and intact; free space and resume with --resume latest.")
    assert sentence in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (ckpts / "step-0000002" / "COMMITTED").exists()  # the partial step is never resumed from
    assert (ckpts / "step-0000001" / "COMMITTED").is_file()
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step2_before = next(r["loss"] for r in first if r["step"] == 2)

    assert [r["step"] for r in first] == [1, 2]  # step 2 was logged, then its save failed
    deepspeed_train([*args, "--resume", "latest"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # each step once: the resume from step 1 logs step 2 anew
    assert records[1]["loss"] == step2_before  # resumed from step 1: step 2 again, bit for bit
    assert (ckpts / "step-0000003" / "COMMITTED").is_file()


def signalled_run(args: list[str], send, script: Path = ROOT / "train.py",
                  every_steps: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Starts a 2-process deepspeed run of `script` in its own process group, calls send(runner) once step 1
    is logged, and waits for every process that holds the output. Returns the result and the command lines of
    the processes left alive; no shared-memory buffer of the run's master port is left either."""
    run_dir = Path(next(a for a in args if a.startswith("--logging.run_dir=")).split("=", 1)[1])
    port = net.free_port()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(script),
           *args, "--train.max_steps=500", f"--checkpoint.every_steps={every_steps}"]
    runner = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert runner.poll() is None, runner.communicate()[1][-3000:]
            time.sleep(0.2)
        send(runner)
        out, err = runner.communicate(timeout=120)  # the pipes close when the last rank has exited
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    left = live_in_group(runner.pid)
    assert not shm_buffers(port)  # the ranks removed DeepSpeed's buffers (a run's 2 x 69 MB of RAM)
    return subprocess.CompletedProcess(cmd, runner.returncode, out, err), left


def live_in_group(pgid: int, grace_s: float = 60) -> list[str]:
    """The command lines of the group's processes still alive once those already exiting had time to end. The
    pipes close when the last process has closed them, which an exiting process does before it is gone (a
    loaded machine shows the orphaned launcher in between); the grace only bounds a process that never ends."""
    end = time.monotonic() + grace_s
    while True:
        left = []
        for p in psutil.process_iter(["status", "cmdline"]):
            if _group(p) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.info["cmdline"] or []))
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except OSError:
        return None


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


STOPPED = re.compile(r"train.py: stopped on (.+) after step (\d+); checkpoint step-(\d+) is committed; resume with "
                     r"--resume latest\.")


def test_ctrl_c_stops_at_a_committed_step_and_a_resume_refuses_changes_and_moves_to_one_process_and_back(
        tiny_model_dir, data_dir, tmp_path):
    """SIGINT to the whole launch (a terminal's Ctrl-C): the launcher passes it on as SIGTERM, the ranks finish
    their step, save it and exit non-zero with one line; no rank says another failed. Then a resume with
    another LoRA rank or other data is refused before anything is written, one on 1 process converts the
    2-process checkpoint (DeepSpeed's universal checkpoint), and one on 2 processes again continues that;
    metrics.jsonl holds each step once."""
    run = tmp_path / "ctrl-c"
    args = common_args(tiny_model_dir, data_dir, run)
    result, left = signalled_run(args, lambda runner: os.killpg(runner.pid, signal.SIGINT))
    assert result.returncode != 0 and not left, left
    lines = [m for m in map(STOPPED.search, result.stderr.splitlines()) if m]
    assert len(lines) == 1, result.stderr[-3000:]
    cause, step, tag = lines[0].groups()
    stop = int(step)
    assert cause == "SIGINT" and stop == int(tag) and committed_steps(run) == [stop]
    assert sorted(losses(run)) == list(range(1, stop + 1))
    assert len(list((run / "checkpoints" / f"step-{tag}").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert "another rank failed" not in result.stderr

    resume = [*args, f"--train.max_steps={stop + 2}", "--checkpoint.every_steps=0", "--resume", "latest"]
    config = (run / "config.json").read_bytes()
    for change, named in ((["--lora.rank=4", "--lora.target_modules=to_q"], "lora.rank from 8 to 4; lora.target_modules"),
                          (["--data.hflip=false"], "was trained on other data (data.hflip from True to False)")):
        refused = subprocess.run([sys.executable, str(ROOT / "train.py"), *resume, *change], env=_env(),
                                 capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr[-3000:]
        assert refused.stderr.startswith("train.py: error: Checkpoint ") and named in refused.stderr
    assert (run / "config.json").read_bytes() == config  # nothing written before the check

    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *resume, f"--train.stop_at_step={stop + 1}"],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"at step {stop}, saved by 2 process(es), now 1" in logged(one)
    assert len(list((run / "checkpoints" / f"step-{stop + 1:07d}").glob("zero_pp_rank_*_optim_states.pt"))) == 1
    assert not (run / "checkpoints" / "universal").exists()  # the converted copy goes once loaded
    back = deepspeed_train(resume)
    assert f"at step {stop + 1}, saved by 1 process(es), now 2" in logged(back)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stop + 3))


# ZeRO-3 full fine-tuning: the UNet is partitioned as it loads, and what each rank holds is the base's weights.
ZERO3_FULL_CHECK = TRAINER_SET_UP + """
from safetensors.torch import load_file

unet = trainer.engine.module.unet
base = load_file(cfg.model.pretrained_dir + "/unet/diffusion_pytorch_model.safetensors")
params = dict(unet.named_parameters())
largest = max(params, key=lambda n: params[n].ds_numel)
held = params[largest].ds_tensor.numel()
with deepspeed.zero.GatheredParameters(list(params.values())):
    same = all(torch.equal(p.float(), base[n]) for n, p in params.items())
trainer.train()
if info.rank == 0:
    json.dump({{"held": held, "whole": params[largest].ds_numel, "same_as_base": same}},
              open(cfg.logging.run_dir + "/zero3_full_check.json", "w"))
"""


def test_zero3_full_fine_tuning_partitions_the_unet_as_it_loads(tiny_model_dir, data_dir, tmp_path):
    """Under ZeRO-3 each rank makes only its part of every UNet weight and fills it from the base's file
    (deepspeed.zero.Init), so no rank holds the whole UNet at start-up; training and the export go on."""
    from diffusers import UNet2DConditionModel

    run = tmp_path / "z3full"
    script = tmp_path / "zero3_full_check.py"
    script.write_text(ZERO3_FULL_CHECK.format(root=str(ROOT)))
    args = common_args(tiny_model_dir, data_dir, run, train__max_steps=2, checkpoint__every_steps=0,
                       checkpoint__save_final="false", train__ds_config="ds_configs/zero3.json",
                       model__unet_mode="full", textual_inversion__enabled="false")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(net.free_port()), str(script), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = json.loads((run / "zero3_full_check.json").read_text())
    assert check["same_as_base"] and check["held"] == -(-check["whole"] // 2), check  # half of it on each rank
    trained = UNet2DConditionModel.from_pretrained(run / "export" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))


# One process resumes a checkpoint that 2 processes saved: the weights it loaded, exported as a step's export is,
# then two more steps.
RESUME_CHECK = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from defect_ds.config import load_config
from defect_ds.train.distributed import init_distributed
from defect_ds.train.trainer import Trainer
from train import parse_args

cfg = load_config(*parse_args(sys.argv[1:]))
trainer = Trainer(cfg, init_distributed())
trainer.setup()
trainer.exporter.write(trainer.model, Path(cfg.logging.run_dir) / "resumed", trainer.state.step)
trainer.train()
"""


def test_a_zero3_checkpoint_of_two_processes_resumes_on_one_with_the_weights_it_saved(tiny_model_dir, data_dir,
                                                                                       tmp_path):
    """ZeRO-3 partitions the weights as well as the optimizer state; DeepSpeed's universal checkpoint puts
    them together again for one process, bit for bit, and training goes on."""
    run = tmp_path / "z3"
    args = common_args(tiny_model_dir, data_dir, run, train__ds_config="ds_configs/zero3.json", train__max_steps=3,
                       checkpoint__every_steps=0)
    deepspeed_train([*args, "--train.stop_at_step=1"])
    assert len(list((run / "checkpoints" / "step-0000001").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    script = tmp_path / "resume_check.py"
    script.write_text(RESUME_CHECK.format(root=str(ROOT)))
    one = subprocess.run([sys.executable, str(script), *args, "--resume", "latest"], env=_env(),
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "at step 1, saved by 2 process(es), now 1" in logged(one)
    saved = sorted((run / "exports" / "step-0000001").rglob("*.safetensors"))
    resumed = sorted((run / "resumed").rglob("*.safetensors"))
    assert [p.relative_to(run / "resumed") for p in resumed] == [p.relative_to(run / "exports" / "step-0000001")
                                                                  for p in saved] and saved
    for a, b in zip(saved, resumed):
        a, b = load_file(a), load_file(b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), b
    assert committed_steps(run) == [1, 3] and sorted(losses(run)) == [1, 2, 3]
    assert not (run / "checkpoints" / "universal").exists()


@pytest.mark.parametrize("target", ["runner", "rank 1"])
def test_sigterm_to_the_runner_or_to_one_rank_stops_both_ranks_at_one_step(tiny_model_dir, data_dir, tmp_path,
                                                                           target):
    """Signalled alone, DeepSpeed's runner exits at once: the ranks notice and stop as on a signal. A signal to
    one rank reaches the other through the step's all_reduce, so both save the same step."""
    def send(runner):
        if target == "runner":
            runner.send_signal(signal.SIGTERM)
        else:
            ranks = [p for p in psutil.Process(runner.pid).children(recursive=True)
                     if "--local_rank=1" in p.cmdline()]
            ranks[0].send_signal(signal.SIGTERM)

    run = tmp_path / target.replace(" ", "")
    result, left = signalled_run(common_args(tiny_model_dir, data_dir, run), send)
    assert result.returncode != 0 and not left, (left, result.stderr[-3000:])
    [line] = [m for m in map(STOPPED.search, result.stderr.splitlines()) if m]
    cause, step, tag = line.groups()
    expected = r"SIGTERM sent to another rank" if target == "rank 1" else r"the exit of the deepspeed runner \(pid \d+\)"
    assert re.fullmatch(expected, cause), cause
    assert committed_steps(run) == [int(step)] and max(losses(run)) == int(step)
    assert "another rank failed" not in result.stderr and "Traceback" not in result.stderr


# The save of step 2 starts, waits until this rank got the first signal, writes part of a file and then never
# ends: only a second signal can end the rank. Marks in MARKS say how far each rank got.
SLOW_SAVE_WRAPPER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from defect_ds.train import stop

requests = []
_request = stop.StopRequest.request
def request(self, *args, **kwargs):
    requests.append(args)
    return _request(self, *args, **kwargs)
stop.StopRequest.request = request

_save = torch.save
def save(obj, f, *args, **kwargs):
    if "step-0000002" in str(f):
        marks = Path({marks!r})
        (marks / ("saving-rank" + os.environ["RANK"])).touch()
        while not requests:
            time.sleep(0.05)
        with open(f, "wb") as out:
            out.write(b"partial")
        (marks / ("signalled-rank" + os.environ["RANK"])).touch()
        while True:
            time.sleep(0.05)
    return _save(obj, f, *args, **kwargs)
torch.save = save
import train
sys.exit(train.main())
"""


def wait_for(paths: list[Path], deadline_s: float = 300) -> None:
    """Polls until every path exists; the deadline only keeps a broken run from hanging the suite."""
    end = time.monotonic() + deadline_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < end, f"never appeared: {[p.name for p in paths if not p.exists()]}"
        time.sleep(0.2)


def test_a_second_ctrl_c_during_the_stop_save_exits_at_once_and_the_last_committed_checkpoint_resumes(
        tiny_model_dir, data_dir, tmp_path):
    """Ctrl-C while step 2 is being saved, and Ctrl-C again once the first was taken (later than the launcher's
    forwarded copy): the ranks exit at once without finishing that save, which therefore cannot have ended on
    its own, and non-zero; step 1, the newest committed checkpoint, is what --resume latest picks and a resume
    from it runs."""
    from defect_ds.train.checkpoint import find_resume_tag
    from defect_ds.train.stop import REPEAT_WINDOW_S

    run, marks = tmp_path / "twice", tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE_WRAPPER.format(root=str(ROOT), marks=str(marks)))

    def send(runner):
        wait_for([marks / "saving-rank0", marks / "saving-rank1"])
        os.killpg(runner.pid, signal.SIGINT)
        wait_for([marks / "signalled-rank0", marks / "signalled-rank1"])  # the first is taken; the save goes on
        time.sleep(REPEAT_WINDOW_S + 0.5)  # a person's second Ctrl-C, not the launcher's copy of the first
        os.killpg(runner.pid, signal.SIGINT)

    args = common_args(tiny_model_dir, data_dir, run)
    result, left = signalled_run(args, send, script=script, every_steps=1)
    assert result.returncode != 0 and not left, (left, result.stderr[-3000:])
    assert result.stderr.count("train.py: stopped at once on a second SIGINT; the last committed checkpoint is "
                               "intact; resume with --resume latest.") == 1, result.stderr[-3000:]
    assert not [m for m in map(STOPPED.search, result.stderr.splitlines()) if m]  # no stop-save was committed
    assert "another rank failed" not in result.stderr
    assert committed_steps(run) == [1] and (run / "checkpoints" / "step-0000002").is_dir()  # step 2: cut short
    assert find_resume_tag(run / "checkpoints", "latest") == "step-0000001"

    resumed = deepspeed_train([*args, "--train.max_steps=2", "--checkpoint.every_steps=1", "--resume", "latest"])
    # the console wraps long lines (a path may break at a slash), so compare without whitespace
    said = "".join((resumed.stdout + resumed.stderr).split())
    assert "".join(f"resumed from {run / 'checkpoints' / 'step-0000001'} at step 1".split()) in said
    assert committed_steps(run) == [1, 2]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_second_launch_into_a_locked_run_dir_or_onto_a_busy_port_stops_in_one_sentence(tiny_model_dir, data_dir,
                                                                                          tmp_path):
    """The run directory is held (as by a first launch still running): the second launch, two ranks under
    deepspeed, stops with one sentence naming the holder and writes nothing. A master port in use: one
    sentence naming the port, not torch's DistNetworkError."""
    import socket

    from defect_ds.train.run_lock import LOCK_FILE, RunDirLock

    run = tmp_path / "busy"
    held = RunDirLock.take(run)
    (run / "config.json").write_text("{}\n")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_FILE}
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(net.free_port()), str(ROOT / "train.py"),
           *common_args(tiny_model_dir, data_dir, run, train__max_steps=2)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    held.release()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]  # rank 0 says it; rank 1 got the same verdict
    assert errors[0].startswith(f"train.py: error: {run} is in use by another launch (pid {os.getpid()} on host "
                                f"{socket.gethostname()}, since ")
    assert f"lock file {run / LOCK_FILE}); wait for it to end or stop it" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # config.json untouched, nothing new

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *common_args(tiny_model_dir, data_dir, run)],
                                env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith(f"train.py: error: The master port {port} on 127.0.0.1 is in use by another "
                                    "launch or program; give this launch another one: deepspeed --master_port ")
    assert len(result.stderr.splitlines()) == 1 and not (run / "metrics.jsonl").exists()
