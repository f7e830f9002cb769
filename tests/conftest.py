"""Shared fixtures: everything a test needs is made here, small, offline."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Stable Diffusion folder in the real diffusers layout."""
    from defect_ds.model.tiny import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny-sd")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
