"""Imports run one way: the training loop does not reach into generation or evaluation."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "defect_ds"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_train_imports_neither_generate_nor_evaluate():
    found = {f"{path.name}: {name}" for path in (PACKAGE / "train").glob("*.py") for name in imported_modules(path)
             if name.startswith(("defect_ds.generate", "defect_ds.evaluate"))}
    assert found == set()


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from defect_ds.generate.masks import random_mask\n")
    assert "defect_ds.generate.masks" in imported_modules(module)
