"""`defect-ds prepare elpv`: labels become good, defect or left out; records keep the cell type and
probability; bad label files get one sentence and nothing is written. Runs on a fake ELPV folder."""
from __future__ import annotations

import importlib.util
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from defect_ds.cli import main
from defect_ds.data import elpv
from defect_ds.data.reader import iter_dataset


@pytest.fixture(scope="module")
def elpv_dir(make_elpv, tmp_path_factory):
    return make_elpv(tmp_path_factory.mktemp("elpv"))


def prepare(*args) -> int:
    return main(["prepare", "elpv", *map(str, args), "--no-progress"])


def test_prepare_keeps_cell_type_and_probability_and_leaves_uncertain_cells_out(elpv_dir, tmp_path):
    out = tmp_path / "out"
    assert prepare(elpv_dir, out, "--resolution-px", 32) == 0
    items = list(iter_dataset(out))
    by_type = {t: [i for i in items if i["meta"]["defect_type"] == t] for t in ("good", "defect")}
    assert len(by_type["good"]) == 16 and len(by_type["defect"]) == 14 and len(items) == 30  # 4 at 1/3 left out
    assert {i["meta"]["defect_probability"] for i in by_type["defect"]} == {0.6667, 1.0}
    assert {i["meta"]["defect_probability"] for i in by_type["good"]} == {0.0}
    poly = next(i for i in by_type["defect"] if i["meta"]["cell_type"] == "poly")
    assert poly["meta"]["category"] == "poly"
    assert poly["caption"] == "an electroluminescence image of a poly solar cell with sks_defect"
    good = by_type["good"][0]
    assert good["caption"] == f"an electroluminescence image of a {good['meta']['cell_type']} solar cell"
    full = np.asarray(Image.open(io.BytesIO(poly["mask"])))
    empty = np.asarray(Image.open(io.BytesIO(good["mask"])))
    assert full.shape == (32, 32) and full.min() == 255 and empty.max() == 0
    assert Image.open(io.BytesIO(poly["image"])).size == (32, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == {"defect_threshold": 0.5, "uncertain": "drop", "uncertain_left_out": 4}
    assert manifest["defect_tokens"] == {"defect": "sks_defect"} and manifest["categories"] == ["mono", "poly"]


@pytest.mark.parametrize("flags, good, defect", [
    (["--uncertain", "good"], 20, 14),  # Deitsch et al.'s binarisation: 1/3 counts as functional
    (["--defect-threshold", "1.0"], 16, 10),  # 1/3 and 2/3 left out
    (["--defect-threshold", "0.3"], 16, 18),
])
def test_the_threshold_and_the_uncertain_cells(elpv_dir, tmp_path, flags, good, defect):
    assert prepare(elpv_dir, tmp_path / "out", *flags) == 0
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert sum(c.get("good", 0) for c in counts.values()) == good
    assert sum(c.get("defect", 0) for c in counts.values()) == defect


def test_the_installed_package_is_the_default_and_its_absence_is_one_sentence(elpv_dir, tmp_path, monkeypatch,
                                                                               capsys):
    real_find_spec = importlib.util.find_spec

    def installed(name, *args):
        if name == "elpv_dataset":
            return SimpleNamespace(origin=str(elpv_dir / "__init__.py"))  # labels.csv then lies in <package>/data
        return real_find_spec(name, *args)

    monkeypatch.setattr(elpv, "default_root", lambda: elpv_dir)  # the folder layout is checked below
    assert prepare(tmp_path / "out") == 0 and (tmp_path / "out" / "manifest.json").is_file()
    capsys.readouterr()  # the table of counts
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", installed)
    assert elpv.default_root() == elpv_dir / "data"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "elpv_dataset"
                        else real_find_spec(name, *a))
    assert prepare(tmp_path / "out2") == 2
    err = capsys.readouterr().err.strip()
    assert "not installed; pip install 'defect-ds[elpv]'" in err and "\n" not in err
    assert not (tmp_path / "out2").exists()


def _edited(make_elpv, root, edit):
    make_elpv(root)
    labels = root / "labels.csv"
    labels.write_text(edit(labels.read_text()))
    return root


@pytest.mark.parametrize("edit, flags, message", [
    (lambda t: t.replace("0.6666666666666666", "0.5", 1), [], "line 11 has the unknown label '0.5'"),
    (lambda t: t.replace("mono", "cigs", 1), [], "line 1 has the unknown cell type 'cigs'"),
    (lambda t: t + "images/cell9999.png  1.0  mono\n", [], "cell9999.png, which does not exist"),
    (lambda t: t.replace("  0.0  mono", "  0.0mono", 1), [], "line 1 has 2 fields"),
    (lambda t: "\n".join(l for l in t.splitlines() if " 0.0 " in l), [], "gives good cells only"),
    (lambda t: t, ["--defect-threshold", "0"], "--defect-threshold 0.0 is invalid"),
])
def test_bad_labels_get_one_sentence_and_nothing_is_written(make_elpv, tmp_path, capsys, edit, flags, message):
    root = _edited(make_elpv, tmp_path / "elpv", edit)
    assert prepare(root, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
