"""Library notices a user can do nothing about stay off; the rest still print."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

PROBE = ("import logging, sys; logging.basicConfig(stream=sys.stderr); {quiet}"
         "import torch.utils.cpp_extension")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is printed only where CUDA is unavailable")
def test_the_no_cuda_runtime_notice_is_off_and_only_that(tmp_path):
    def stderr(quiet: str) -> str:
        env = {"CUDA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-c", PROBE.format(quiet=quiet)], env=env, capture_output=True,
                              text=True, check=True).stderr

    assert "No CUDA runtime is found" in stderr("")  # the probe would show it
    assert "No CUDA runtime is found" not in stderr(
        "from defect_ds.utils.quiet import quiet_cuda_probe; quiet_cuda_probe(); ")
