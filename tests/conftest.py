"""Shared fixtures: everything a test needs is made here, small, offline."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """load_script("benchmarks/elpv.py") imports a script of the repository that is not in the package (a
    benchmark, a tool) as a module, once per session."""
    loaded = {}

    def load(relative: str):
        if relative not in loaded:
            spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[relative] = module
        return loaded[relative]

    return load


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


# ELPV's labels, a few of each per cell type; the real images are CC BY-NC-SA, so tests draw their own
ELPV_CELLS = [(p, t) for t in ("mono", "poly") for p, n in (("0.0", 8), ("0.3333333333333333", 2),
                                                            ("0.6666666666666666", 2), ("1.0", 5)) for _ in range(n)]


@pytest.fixture(scope="session")
def make_elpv():
    """make_elpv(folder, cells=ELPV_CELLS, size_px=40) writes a fake ELPV data folder, `labels.csv` (one
    `images/cellNNNN.png PROBABILITY TYPE` a line) and grayscale PNGs (defect cells with a dark crack),
    and returns the folder."""
    import numpy as np
    from PIL import Image

    def make(root: Path, cells: list[tuple[str, str]] = ELPV_CELLS, size_px: int = 40) -> Path:
        (root / "images").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        lines = []
        for i, (probability, cell_type) in enumerate(cells, 1):
            cell = rng.normal(150 if cell_type == "mono" else 120, 12, (size_px, size_px))
            if float(probability) > 0:
                row = int(rng.integers(4, size_px - 4))
                cell[row - 1:row + 1, 4:-4] = 30
            name = f"images/cell{i:04d}.png"
            Image.fromarray(np.clip(cell, 0, 255).astype(np.uint8), "L").save(root / name)
            lines.append(f"{name}  {probability}  {cell_type}")
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
        return root

    return make


@pytest.fixture(scope="session", autouse=True)
def master_ports():
    """Notes each port a test draws from `defect_ds.utils.net.free_port` (the master ports of the launches the
    tests start) and, when the session ends, removes the shared-memory buffers DeepSpeed made in /dev/shm
    for those ports (69 MB a rank) that a run killed before train.py removed them left behind. Buffers of
    other ports, and of a port some launch listens on again by then, are not the tests' and stay."""
    from defect_ds.train.distributed import shm_buffers
    from defect_ds.utils import net

    drawn, draw = [], net.free_port

    def free_port() -> int:
        drawn.append(draw())
        return drawn[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(net, "free_port", free_port)
        yield drawn
    for port in drawn:
        if _listened_on(port):
            continue
        for buffer in shm_buffers(port):
            buffer.unlink(missing_ok=True)


def _listened_on(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a finished launch's TIME_WAIT is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class FullDisk:
    """A disk that fills up: after `after_writes` successful writes, each write through the atomic helpers
    (`defect_ds.utils.files`) or Path.write_bytes/write_text puts its first 4096 bytes down and then fails
    with ENOSPC, as a real full disk cuts a file."""

    CUT_BYTES = 4096

    def __init__(self):
        self.patch = pytest.MonkeyPatch()
        self.left = None  # writes that still succeed; None: the disk has room

    def fill(self, after_writes: int = 0) -> None:
        import builtins
        import errno
        import pathlib

        from defect_ds.utils import files

        self.left = after_writes
        disk = self

        def take(path, data, write):
            if disk.left is None or disk.left > 0:
                disk.left = None if disk.left is None else disk.left - 1
                return write(data)
            write(data[:FullDisk.CUT_BYTES])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        class Filling:
            def __init__(self, path, mode):
                self.path, self.file = path, builtins.open(path, mode)

            def write(self, data):
                return take(self.path, data, self.file.write)

            def writelines(self, lines):
                for line in lines:
                    self.write(line)

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        write_bytes, write_text = pathlib.Path.write_bytes, pathlib.Path.write_text
        self.patch.setattr(files, "open", Filling, raising=False)
        self.patch.setattr(pathlib.Path, "write_bytes", lambda p, data: take(p, data, lambda d: write_bytes(p, d)))
        self.patch.setattr(pathlib.Path, "write_text",
                           lambda p, data, *a, **k: take(p, data, lambda d: write_text(p, d, *a, **k)))

    def free(self) -> None:
        self.patch.undo()
        self.left = None


@pytest.fixture
def full_disk():
    disk = FullDisk()
    yield disk
    disk.free()
