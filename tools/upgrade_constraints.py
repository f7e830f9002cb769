"""Re-resolves the dependencies within setup.cfg's ranges, runs the test suite on them, and rewrites
constraints.txt only if the suite passes.

    python tools/upgrade_constraints.py            # or: make upgrade

constraints.txt pins every installed distribution (transitive ones included) to the versions the suite
last passed with; `make install` installs with `-c constraints.txt`. This script builds a throw-away
virtual environment, installs torch (pinned by --torch, as the Makefile's TORCH_PINS), then the package
and its `dev` extra with no constraints (pip takes the newest releases setup.cfg allows), runs pytest
there, and only on success writes the new pins (`pip freeze`, the package itself left out). To try a
new major release of a dependency, raise its upper bound in setup.cfg first, then run this.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "defect-ds"
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"

Runner = Callable[..., subprocess.CompletedProcess]


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_freeze(text: str) -> dict[str, str]:
    """{name: version} from `pip freeze` output; comments, editable and direct-URL lines are skipped
    (a constraints file can only pin released versions by name)."""
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e", "--")) or " @ " in line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"Unexpected `pip freeze` line {line!r}: expected NAME==VERSION.")
        if canonical(name) != PACKAGE:
            pins[name] = version
    return pins


def render_constraints(pins: dict[str, str], header: list[str]) -> str:
    """constraints.txt: a commented header, then one `name==version` per line sorted by name."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins, key=canonical)]
    return "\n".join(lines) + "\n"


def header_lines(python_version: str, torch_pins: str) -> list[str]:
    return [f"Versions `make test` passed with, written by tools/upgrade_constraints.py on {datetime.date.today()}",
            f"(Python {python_version}, {platform.system()} {platform.machine()}, {torch_pins}).",
            "`make install` uses it; `make upgrade` re-resolves within setup.cfg's ranges and rewrites it",
            "only when the suite passes. Edit setup.cfg, not this file."]


def upgrade(root: Path, *, python: str, torch_pins: str, pytest_args: list[str], venv_dir: Path,
            runner: Runner = subprocess.run, log: Callable[[str], None] = print) -> bool:
    """Builds the venv in venv_dir, installs, tests; writes root/constraints.txt only if pytest passed.
    Returns whether it was written. `runner` is subprocess.run (a stand-in in the tests)."""
    bin_dir = venv_dir / ("Scripts" if os.name == "nt" else "bin")
    venv_python = str(bin_dir / "python")
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_HUB_OFFLINE": "1"}
    env.pop("PIP_CONSTRAINT", None)  # a constraint set in the environment would defeat the re-resolve
    env.pop("VIRTUAL_ENV", None)
    steps = [("create the virtual environment", [python, "-m", "venv", str(venv_dir)]),
             ("upgrade pip", [venv_python, "-m", "pip", "install", "-q", "--upgrade", "pip"]),
             ("install torch", [venv_python, "-m", "pip", "install", "-q", *shlex.split(torch_pins)]),
             ("install the package without constraints",
              [venv_python, "-m", "pip", "install", "-q", "-e", f"{root}[dev]"])]
    for what, cmd in steps:
        log(f"upgrade: {what}")
        if runner(cmd, cwd=root, env=env).returncode != 0:
            log(f"upgrade: could not {what} ({shlex.join(cmd)}); constraints.txt is unchanged.")
            return False
    log(f"upgrade: running the suite (pytest {shlex.join(pytest_args)})")
    if runner([venv_python, "-m", "pytest", *pytest_args], cwd=root, env=env).returncode != 0:
        log("upgrade: the suite failed on the re-resolved versions; constraints.txt is unchanged.")
        return False
    freeze = runner([venv_python, "-m", "pip", "freeze", "--exclude-editable"], cwd=root, env=env,
                    capture_output=True, text=True)
    version = runner([venv_python, "-c", "import platform; print(platform.python_version())"], cwd=root, env=env,
                     capture_output=True, text=True)
    if freeze.returncode != 0 or version.returncode != 0:
        log("upgrade: `pip freeze` failed in the new environment; constraints.txt is unchanged.")
        return False
    pins = parse_freeze(freeze.stdout)
    path = root / "constraints.txt"
    old = parse_freeze(path.read_text()) if path.is_file() else {}
    tmp = path.with_suffix(".txt.partial")
    tmp.write_text(render_constraints(pins, header_lines(version.stdout.strip(), torch_pins)))
    tmp.replace(path)
    changed = {name: (old.get(name), v) for name, v in pins.items() if old.get(name) != v}
    gone = sorted(set(old) - set(pins), key=canonical)
    for name, (before, after) in sorted(changed.items(), key=lambda kv: canonical(kv[0])):
        log(f"  {name}: {before or 'new'} -> {after}")
    for name in gone:
        log(f"  {name}: {old[name]} -> removed")
    log(f"upgrade: the suite passed; wrote {path} ({len(pins)} pins, {len(changed) + len(gone)} changed).")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default=sys.executable, help="interpreter that creates the virtual environment")
    p.add_argument("--torch", default=DEFAULT_TORCH, help="torch requirements installed first (the Makefile's TORCH_PINS)")
    p.add_argument("--pytest-args", default="-q", help='arguments of the suite run, e.g. "-q -m \'not slow\'"')
    p.add_argument("--keep-venv", help="build the environment in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    if args.keep_venv:
        venv_dir, cleanup = Path(args.keep_venv), None
    else:
        cleanup = tempfile.mkdtemp(prefix="defect-ds-upgrade-")
        venv_dir = Path(cleanup) / "venv"
    try:
        ok = upgrade(ROOT, python=args.python, torch_pins=args.torch, pytest_args=shlex.split(args.pytest_args),
                     venv_dir=venv_dir)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
