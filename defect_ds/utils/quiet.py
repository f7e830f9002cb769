"""Library notices a user can do nothing about, silenced where we call the libraries.

    python -c "from defect_ds.utils.quiet import quiet_libraries; print(quiet_libraries)"

diffusers and transformers print, on every load: the safety-checker notice (we pass none: these are
parts, not people), the LoRA text-encoder prefix note (our exports adapt the UNet only) and the
embedding-resize note (new token rows are set by the export, not by the resize), and the notice that
`torch_dtype` is renamed (the old name works on every diffusers release setup.cfg admits). Errors
still print.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()


def quiet_cuda_probe() -> None:
    """torch's C++ extension helper, which DeepSpeed imports, warns at import time on a machine with a
    CUDA toolkit and no GPU that it found no CUDA runtime: true of every CPU run there, nothing to act on.
    That module's errors still print."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
