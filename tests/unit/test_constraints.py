"""constraints.txt and tools/upgrade_constraints.py: the shipped pins satisfy setup.cfg's ranges, and the
upgrade rewrites the file only when the re-resolved environment passes the suite (pip and pytest
replaced by a stand-in runner; no environment is built)."""
from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool(load_script):
    return load_script("tools/upgrade_constraints.py")


def setup_cfg_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["dev"].split("\n")
    return [Requirement(line) for line in lines if line.strip()]


def test_shipped_pins_satisfy_the_ranges_and_every_range_has_an_upper_bound(tool):
    text = (ROOT / "constraints.txt").read_text()
    pins = {tool.canonical(k): v for k, v in tool.parse_freeze(text).items()}
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "defect-ds" not in pins and len(pins) > 50  # transitive dependencies too
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == sorted(body, key=lambda line: tool.canonical(line.split("==")[0]))
    for req in setup_cfg_requirements():
        assert any(s.operator == "<" for s in req.specifier), f"{req} has no upper bound"
        assert req.specifier.contains(pins[tool.canonical(req.name)]), f"constraints.txt pins {req.name} outside {req}"


def test_freeze_lines_become_sorted_pins_without_the_package(tool):
    freeze = ("# Editable Git install with no remote (defect-ds==0.1.0)\n-e /work/main\n"
              "torch_fidelity==0.4.0\nabsl-py==2.5.1\nDefect_DS==0.1.0\nJinja2==3.1.6\n"
              "somepkg @ file:///tmp/somepkg.whl\n")
    pins = tool.parse_freeze(freeze)
    assert pins == {"torch_fidelity": "0.4.0", "absl-py": "2.5.1", "Jinja2": "3.1.6"}
    text = tool.render_constraints(pins, ["made by a test", ""])
    assert text == "# made by a test\n#\nabsl-py==2.5.1\nJinja2==3.1.6\ntorch_fidelity==0.4.0\n"
    assert tool.parse_freeze(text) == pins
    with pytest.raises(ValueError, match="NAME==VERSION"):
        tool.parse_freeze("torch>=2\n")


class FakePip:
    """Stands in for subprocess.run: records commands; `fail` names the step that exits 1."""

    def __init__(self, fail: str | None = None, freeze: str = "torch==2.15.0\nzipp==9.9\n-e /repo\n"):
        self.fail, self.freeze, self.commands = fail, freeze, []

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        step = ("pytest" if "pytest" in cmd else "freeze" if "freeze" in cmd else "venv" if "venv" in cmd
                else "install" if "install" in cmd else "other")
        out = self.freeze if step == "freeze" else "3.11.7\n"
        return subprocess.CompletedProcess(cmd, 1 if step == self.fail else 0, stdout=out, stderr="")


def run_upgrade(tool, tmp_path: Path, runner: FakePip) -> tuple[bool, str]:
    (tmp_path / "constraints.txt").write_text("# old\ntorch==2.14.1\n")
    ok = tool.upgrade(tmp_path, python="python3", torch_pins="torch==2.15.0", pytest_args=["-q"],
                      venv_dir=tmp_path / "venv", runner=runner, log=lambda _: None)
    return ok, (tmp_path / "constraints.txt").read_text()


@pytest.mark.parametrize("fail", ["pytest", "install", "venv", "freeze"])
def test_a_failed_step_leaves_constraints_unchanged(tool, tmp_path, fail):
    runner = FakePip(fail=fail)
    ok, text = run_upgrade(tool, tmp_path, runner)
    assert not ok and text == "# old\ntorch==2.14.1\n"
    assert not list(tmp_path.glob("*.partial"))


def test_a_passing_suite_rewrites_constraints_from_the_new_environment(tool, tmp_path):
    runner = FakePip()
    ok, text = run_upgrade(tool, tmp_path, runner)
    assert ok
    assert [line for line in text.splitlines() if not line.startswith("#")] == ["torch==2.15.0", "zipp==9.9"]
    assert "Python 3.11.7" in text and "torch==2.15.0" in text.splitlines()[1]
    installs = [c for c in runner.commands if "install" in c]
    assert all("-c" not in c and "--constraint" not in c for c in installs)  # re-resolved, not re-pinned
    assert any(c[-1] == "torch==2.15.0" for c in installs)
    suite = next(i for i, c in enumerate(runner.commands) if "pytest" in c)
    freeze = next(i for i, c in enumerate(runner.commands) if "freeze" in c)
    assert suite < freeze and runner.commands[suite][0] == str(tmp_path / "venv" / "bin" / "python")
