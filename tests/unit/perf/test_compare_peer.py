"""benchmarks/compare_peer.py on two stand-in trainers: step lines parsed, ratio and set-up time written."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest



@pytest.fixture(scope="module")
def compare_peer(load_script):
    return load_script("benchmarks/compare_peer.py")


def fake_trainer(tmp_path: Path, name: str, line: str, step_s: float) -> str:
    """A command printing one step line per `step_s` seconds, {steps} of them."""
    script = tmp_path / f"{name}.py"
    script.write_text("import sys, time\n"
                      "n = int(sys.argv[1])\n"
                      "for i in range(1, n + 1):\n"
                      f"    time.sleep({step_s})\n"
                      f"    print({line!r}.format(i=i, n=n), flush=True)\n")
    return f"{sys.executable} {script} {{steps}}"


def test_ratio_set_up_time_and_payback_are_written(compare_peer, tmp_path):
    ours = fake_trainer(tmp_path, "ours", "step {i} loss 0.1", 0.02)
    peer = fake_trainer(tmp_path, "peer", "Steps: 50%|##| {i}/{n} [00:01<00:01]", 0.06)
    out = tmp_path / "result.md"
    compare_peer.main(["--ours", ours, "--peer", peer, "--batch", "4", "--steps", "8", "--warmup-steps", "2",
                       "--repeats", "1", "--setup", f"{sys.executable} -c 'import time; time.sleep(0.2)'",
                       "--out", str(out), "--log-dir", str(tmp_path / "logs")])
    text = out.read_text()
    ratio = float(text.split("ours / peer images/s: ")[1].split("x")[0])
    assert 1.5 < ratio < 6  # ours sleeps a third of the peer's time per step
    assert "one-time set-up (`--setup`), not in the rates:" in text
    payback = int(text.split("paid back after ")[1].split(" steps")[0])
    assert payback >= 1
    assert "launch to the first step line" in text


def test_too_few_steps_after_warm_up_is_an_error(compare_peer):
    with pytest.raises(ValueError, match="fewer than two steps"):
        compare_peer.images_per_s({1: 0.1, 2: 0.2}, warmup_steps=2, batch=4, max_steps=2)


def test_a_failing_run_is_one_sentence_and_writes_nothing(compare_peer, tmp_path):
    ours = fake_trainer(tmp_path, "ours", "step {i} loss 0.1", 0.0)
    out = tmp_path / "result.md"
    with pytest.raises(SystemExit, match=r"peer run 0 failed \(exit code 3; .*Nothing was written"):
        compare_peer.main(["--ours", ours, "--peer", f"{sys.executable} -c 'raise SystemExit(3)'", "--batch", "4",
                           "--steps", "4", "--warmup-steps", "1", "--repeats", "1", "--out", str(out),
                           "--log-dir", str(tmp_path / "logs")])
    assert not out.exists()


def test_a_failing_setup_is_one_sentence(compare_peer, tmp_path):
    with pytest.raises(SystemExit, match="--setup command exited with code 2"):
        compare_peer.main(["--ours", "true", "--peer", "true", "--batch", "1", "--setup", "exit 2",
                           "--out", str(tmp_path / "r.md"), "--log-dir", str(tmp_path / "logs")])
