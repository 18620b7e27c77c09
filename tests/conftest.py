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


@pytest.fixture(scope="session")
def mindone_model(tiny_checkpoint, runtime_cpu):
    """mindone's model on the tiny checkpoint (fp32, eager), for tests that only read it."""
    import mindspore as ms
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=ms.float32, attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_plan(tiny_checkpoint, runtime_cpu):
    """scripts/plan_memory.py's plan for the tiny checkpoint on 2 ranks, in the tests' float32."""
    from scripts.plan_memory import plan

    return plan(str(tiny_checkpoint), world_size=2, dtype="float32")
