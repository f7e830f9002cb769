"""retain_freed_memory: applied on glibc, a quiet False where there is no glibc."""
from __future__ import annotations

import ctypes
import platform

import pytest

from defect_ds.utils import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applies_on_glibc():
    assert memory.retain_freed_memory() is True


def test_false_without_glibc(monkeypatch):
    class NotGlibc:  # a C library without gnu_get_libc_version, as musl
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NotGlibc)
    assert memory.retain_freed_memory() is False


def test_false_without_a_c_library(monkeypatch):
    def missing(name):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert memory.retain_freed_memory() is False
