"""Images/s of defect-ds against a peer trainer on the same work, run interleaved A/B/A/B/A/B.

    python benchmarks/compare_peer.py --batch 8 --steps 30 --warmup-steps 5 --repeats 3 \
        --ours "python train.py --config configs/default.toml --train.max_steps={steps} ..." \
        --peer "python train_text_to_image_lora.py --max_train_steps {steps} ..." \
        --label "tiny, 64 px, batch 8" --out benchmarks/results/peer-DATE-tiny.md

Both commands get `{steps}` filled in. Each run's output is read as it comes and the wall clock is
noted when a step number first appears (ours: the `step N` log line, `--logging.log_every_steps=1
--logging.progress_bar=false`; the peer: tqdm's `N/M [`), so start-up, model loading and the first
`--warmup-steps` steps are left out of both: images/s = (last step - first step seen after warm-up)
x batch / the time between them. The runs alternate ours, peer, ours, peer, ... so a change in the
machine's load hits both; the figure to read is the ratio ours/peer of each adjacent pair, reported
as its median and range. The peer's code is not part of this repository: fetch it (for diffusers'
example, examples/text_to_image/train_text_to_image_lora.py of huggingface/diffusers) and run it on
the same model folder and images (an imagefolder with metadata.jsonl captions).

`--setup` runs a command once before the pairs (e.g. `defect-ds prepare latents ...`, work that ours does
once per data set where the peer repeats it every step) and reports its time beside the ratio, with
the number of steps after which it has paid for itself.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from defect_ds.perf.sweep import cpu_name  # noqa: E402

STEP_PATTERNS = {"ours": r"^step (\d+)\b", "peer": r"^Steps:.*?(\d+)/\d+ \["}  # defaults of the two flags
LIBRARIES = ("torch", "deepspeed", "diffusers", "peft", "transformers", "accelerate")


def step_times(command: str, pattern: str, timeout_s: int, log_path: Path) -> dict[int, float]:
    """Runs `command`; returns {step: seconds since start when it was first printed}."""
    regex = re.compile(pattern)
    seen: dict[int, float] = {}
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, shell=True, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        pending = b""
        try:
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                now = time.perf_counter() - start
                log.write(chunk)
                pending += chunk
                *lines, pending = re.split(rb"[\r\n]", pending)  # tqdm redraws with \r
                for line in lines:
                    match = regex.search(line.decode(errors="replace").strip())
                    if match:
                        seen.setdefault(int(match.group(1)), now)
                if now > timeout_s:
                    raise TimeoutError(f"{command[:80]}... ran past {timeout_s} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}; see {log_path}")
    return seen


def images_per_s(seen: dict[int, float], warmup_steps: int, batch: int, max_steps: int) -> float:
    """(last step - first step at or after the warm-up) x batch / the time between them."""
    steps = sorted(s for s in seen if warmup_steps <= s <= max_steps)
    if len(steps) < 2:
        raise ValueError(f"fewer than two steps were seen after step {warmup_steps}: {sorted(seen)}")
    first, last = steps[0], steps[-1]
    return (last - first) * batch / (seen[last] - seen[first])


def _payback_steps(setup_s: float, rates: dict[str, list[float]], batch: int) -> str:
    """Steps after which `setup_s` is saved by ours' faster steps (median rates), or 'never'."""
    ours, peer = statistics.median(rates["ours"]), statistics.median(rates["peer"])
    saved_per_step = batch / peer - batch / ours
    return "never" if saved_per_step <= 0 else f"{setup_s / saved_per_step:.0f}"


def versions() -> str:
    out = []
    for lib in LIBRARIES:
        try:
            out.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ours", required=True, help="defect-ds command; {steps} is filled in")
    p.add_argument("--peer", required=True, help="peer command; {steps} is filled in")
    p.add_argument("--ours-pattern", default=STEP_PATTERNS["ours"], help="regex whose group 1 is our step")
    p.add_argument("--peer-pattern", default=STEP_PATTERNS["peer"], help="regex whose group 1 is the peer's step")
    p.add_argument("--batch", type=int, required=True, help="images per step (the same for both)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out at the start of each run")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (ours, peer)")
    p.add_argument("--timeout-s", type=int, default=900, help="a run longer than this fails the comparison")
    p.add_argument("--setup", default="", help="a command run once before the pairs; its time is reported")
    p.add_argument("--label", default="", help="what is compared (model, resolution, batch, precision)")
    p.add_argument("--out", default=f"benchmarks/results/peer-{datetime.date.today()}.md")
    p.add_argument("--log-dir", default="/tmp/compare_peer", help="each run's output goes here")
    args = p.parse_args(argv)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    setup_s = None
    if args.setup:
        start = time.perf_counter()
        done = subprocess.run(args.setup, shell=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"compare_peer: the --setup command exited with code {done.returncode}; run it "
                             "alone to see why. Nothing was measured or written.")
        setup_s = time.perf_counter() - start
    rates: dict[str, list[float]] = {"ours": [], "peer": []}
    first_step_s: dict[str, list[float]] = {"ours": [], "peer": []}  # launch to the first step line
    loads: list[str] = []
    for i in range(args.repeats):
        for who in ("ours", "peer"):
            command = getattr(args, who).replace("{steps}", str(args.steps))
            load = os.getloadavg()[0]
            log = log_dir / f"{who}-{i}.log"
            try:
                seen = step_times(command, getattr(args, f"{who}_pattern"), args.timeout_s, log)
                rates[who].append(images_per_s(seen, args.warmup_steps, args.batch, args.steps))
            except (RuntimeError, TimeoutError, ValueError) as e:  # nothing is written before all runs end
                raise SystemExit(f"compare_peer: {who} run {i} failed ({e}); its output is in {log}. "
                                 f"Nothing was written to {args.out}.") from None
            first_step_s[who].append(seen[min(seen)])
            loads.append(f"{who} {i}: {load:.2f} -> {os.getloadavg()[0]:.2f}")
            print(f"run {i} {who}: {rates[who][-1]:.3f} images/s (load {load:.2f})", flush=True)
    ratios = [a / b for a, b in zip(rates["ours"], rates["peer"])]
    lines = [
        f"# defect-ds against a peer trainer: {args.label or 'same work'} ({datetime.date.today()})", "",
        f"**ours / peer images/s: {statistics.median(ratios):.2f}x** (median of {len(ratios)} interleaved pairs; "
        f"range {min(ratios):.2f}-{max(ratios):.2f}x)", "",
        f"- device: {cpu_name()}, {len(os.sched_getaffinity(0))} cores visible, shared with other work; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- versions: Python {sys.version.split()[0]}, {versions()}",
        f"- {args.repeats} pairs, {args.steps} steps per run, batch {args.batch}; timed from the first step "
        f"at or after step {args.warmup_steps} to the last (start-up and warm-up excluded)",
        "- load average (1 min) before -> after each run: " + "; ".join(loads),
        "- launch to the first step line (start-up, model loading, compilation; not in the rates): ours "
        + ", ".join(f"{t:.1f}" for t in first_step_s["ours"]) + " s; peer "
        + ", ".join(f"{t:.1f}" for t in first_step_s["peer"]) + " s",
        *([] if setup_s is None else [
            f"- one-time set-up (`--setup`), not in the rates: {setup_s:.1f} s, paid back after "
            f"{_payback_steps(setup_s, rates, args.batch)} steps at the measured rates"]), "",
        "| pair | ours images/s | peer images/s | ours / peer |", "| ---: | ---: | ---: | ---: |",
    ]
    for i, (a, b, r) in enumerate(zip(rates["ours"], rates["peer"], ratios)):
        lines.append(f"| {i} | {a:.3f} | {b:.3f} | {r:.2f}x |")
    lines += ["", "Commands (`{steps}` = " + str(args.steps) + "):", "", "```bash",
              f"python benchmarks/compare_peer.py {shlex.join(argv if argv is not None else sys.argv[1:])}",
              "```", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines[:3]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
