"""train.py checks every input before the process group, the model or the run dir: a bad launch stops with
one sentence, loads no model and leaves an existing run's record (config.json, metrics.jsonl, tensorboard/)
as it was."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

# runs train.main in a fresh interpreter and reports whether the heavy libraries were imported
PROBE = """
import sys
sys.path.insert(0, {root!r})
import train
rc = train.main(sys.argv[1:])
print("RESULT", rc, "deepspeed" in sys.modules, "diffusers" in sys.modules)
"""


@pytest.fixture(scope="module")
def data_dir(make_synthetic, tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic", resolution_px=64)


def _launch(tmp_path: Path, args: list[str]) -> tuple[int, bool, str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(ROOT)))
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT"))
    _, rc, deepspeed_loaded, diffusers_loaded = line.split()
    return int(rc), deepspeed_loaded == "True" or diffusers_loaded == "True", result.stderr


def _args(model: Path, data: Path, run_dir: Path, **overrides) -> list[str]:
    settings = {"model.pretrained_dir": model, "data.train_shards": data, "logging.run_dir": run_dir,
                "data.resolution_px": 64, "train.micro_batch_size": 2, "train.ds_config": ROOT / "ds_configs" /
                "zero2.json"}
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--{k}={v}" for k, v in settings.items()]


def _existing_run(run_dir: Path) -> dict[str, bytes]:
    """A run's record as an earlier launch left it."""
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "tensorboard" / "events.out").write_bytes(b"events")
    (run_dir / "config.json").write_text(json.dumps({"train": {"micro_batch_size": 2}}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return _record(run_dir)


def _record(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_micro_batch_larger_than_the_data_stops_before_the_model_and_writes_nothing(tiny_model_dir, data_dir,
                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    rc, heavy, err = _launch(tmp_path, _args(tiny_model_dir, data_dir, run_dir, train__micro_batch_size=1000))
    assert rc == 2 and not heavy  # neither DeepSpeed nor the model was loaded
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("train.py: error: train.micro_batch_size=1000 is larger than the")
    assert str(data_dir) in lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("broken", ["model", "data", "ds_config", "resume"])
def test_a_launch_failing_its_checks_leaves_an_existing_run_untouched(broken, tiny_model_dir, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    before = _existing_run(run_dir)
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text('{"train_batch_size": 999}')
    overrides = {"model": dict(model__pretrained_dir=tmp_path / "no-model"),
                 "data": dict(data__train_shards=tmp_path / "no-data"),
                 "ds_config": dict(train__ds_config=bad_ds),
                 "resume": dict(checkpoint__resume="step-0000007")}[broken]
    args = [*_args(tiny_model_dir, data_dir, run_dir, train__micro_batch_size=4, **overrides)]
    if broken != "resume":
        args += ["--resume", "latest"]
    rc, heavy, err = _launch(tmp_path, args)
    assert rc == 2 and not heavy
    assert len([l for l in err.splitlines() if l.strip()]) == 1 and "Traceback" not in err, err
    assert _record(run_dir) == before  # nothing overwritten, nothing added
