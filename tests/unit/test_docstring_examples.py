"""Every command in a module docstring runs as written (or, for long jobs, parses): `python -c` examples
are executed on a fresh clone's files, `defect-ds` and `train.py` command lines are parsed and their
config overrides validated, `python -m` names a module that exists, and a test file named exists."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTS = ("python ", "defect-ds ", "deepspeed ", "torchrun ")


def docstring_commands() -> list[tuple[str, str]]:
    """(file, command) for each example command line in a module docstring, continuation lines joined."""
    found = []
    for path in sorted([*(ROOT / "defect_ds").rglob("*.py"), ROOT / "train.py"]):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        lines = doc.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("    ") and line.strip().startswith(STARTS):
                command = [line.strip()]
                # a command goes on while a line ends in a backslash or a quote is still open
                while i + 1 < len(lines) and (command[-1].endswith("\\") or "\n".join(command).count('"') % 2):
                    i += 1
                    command.append(lines[i])
                # the shell drops a backslash-newline, quoted or not
                text = "\n".join(command).replace("\\\n", "")
                found.append((str(path.relative_to(ROOT)), text.split("  # ")[0].strip()))
            i += 1
    return found


COMMANDS = docstring_commands()
PYTHON_C = [(f, shlex.split(c)[2]) for f, c in COMMANDS if c.startswith("python -c ")]


def test_the_examples_are_found():
    files = {f for f, _ in COMMANDS}
    assert {"train.py", "defect_ds/cli.py", "defect_ds/config.py", "defect_ds/utils/files.py"} <= files
    assert len(PYTHON_C) >= 15


RUNNER = """
import json, sys, traceback
failures = {}
for name, code in json.load(sys.stdin):
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        failures[name + ": " + code[:60]] = traceback.format_exc(limit=2)[-600:]
print(json.dumps(failures))
"""


def test_python_c_examples_run_on_a_fresh_clone():
    """All in one process (one torch import); each in a namespace of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(PYTHON_C), capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("where, command", [(f, c) for f, c in COMMANDS if c.startswith("defect-ds ")])
def test_defect_ds_commands_parse(where, command):
    from defect_ds.cli import parse_command

    argv = shlex.split(command)[1:]
    try:
        args = parse_command(argv)
    except SystemExit as e:  # argparse: 0 after --help, 2 for an unknown command or flag
        assert e.code == 0 and "--help" in argv, f"{where}: {command}"
        return
    assert callable(args.func)


@pytest.mark.parametrize("where, command", [(f, c) for f, c in COMMANDS if "train.py" in c])
def test_train_commands_parse_and_their_overrides_validate(where, command, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import train
    from defect_ds.config import load_config

    argv = shlex.split(command)
    config_path, overrides = train.parse_args(argv[argv.index("train.py") + 1:])
    load_config(config_path and str(ROOT / config_path), overrides)  # raises ConfigError naming a bad field


@pytest.mark.parametrize("where, command", [(f, c) for f, c in COMMANDS if c.startswith("python -m ")])
def test_python_m_examples_name_what_exists(where, command):
    argv = shlex.split(command)
    assert importlib.util.find_spec(argv[2]) is not None, f"{where}: {command}"
    for arg in argv[3:]:
        if arg.startswith("tests/"):
            assert (ROOT / arg).is_file(), f"{where}: {command}"
