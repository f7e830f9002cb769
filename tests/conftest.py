"""Shared fixtures: everything a test needs is made here, small, offline."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Stable Diffusion folder in the real diffusers layout."""
    from defect_ds.model.tiny import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def make_synthetic():
    """make_synthetic(folder, resolution_px=32, per_defect=2, good_per_category=1, **flags) writes a small
    synthetic data set with `defect-ds prepare synthetic` and returns the folder; another flag of the
    command is passed by name (shard_max_samples=10 -> --shard-max-samples 10)."""
    from defect_ds.cli import main

    def make(out: Path, *, resolution_px: int = 32, per_defect: int = 2, good_per_category: int = 1,
             **flags) -> Path:
        args = ["prepare", "synthetic", str(out), "--resolution-px", str(resolution_px), "--per-defect",
                str(per_defect), "--good-per-category", str(good_per_category), "--no-progress"]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        assert main(args) == 0
        return out

    return make


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
