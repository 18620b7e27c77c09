"""Shared fixtures: the tiny checkpoint and the sample media, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from scripts.make_sample_media import build_media  # noqa: E402
from scripts.make_tiny_checkpoint import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_ckpt")
    build_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def sample_media(tmp_path_factory) -> dict[str, Path]:
    paths = build_media(tmp_path_factory.mktemp("media"))
    return {name.split(".")[0]: path for name, path in paths.items()}


@pytest.fixture(scope="session")
def runtime_cpu():
    """The project's CPU runtime in the test process (mindone's processor needs its kernels too)."""
    from omni_helpers.runtime import setup_runtime

    return setup_runtime("CPU", seed=0)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """transformers' PyTorch model on the tiny checkpoint: the yardstick."""
    from tests.reference import Reference

    return Reference(tiny_checkpoint)
