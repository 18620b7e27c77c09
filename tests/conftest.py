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
def tiny_thinking(tmp_path_factory) -> Path:
    """Like the released Thinking checkpoint: no talker, no code2wav."""
    path = tmp_path_factory.mktemp("tiny_thinking")
    build_checkpoint(path, seed=0, variant="thinking")
    return path


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory) -> Path:
    """Like the released Captioner: no talker; its folder names it, as the released one's does."""
    path = tmp_path_factory.mktemp("tiny_captioner")
    build_checkpoint(path, seed=0, variant="captioner")
    return path


@pytest.fixture(scope="session")
def sample_media(tmp_path_factory) -> dict[str, Path]:
    paths = build_media(tmp_path_factory.mktemp("media"))
    return {name.split(".")[0]: path for name, path in paths.items()}


@pytest.fixture(scope="session")
def short_audio(sample_media, tmp_path_factory) -> Path:
    """The first 0.75 s of the sample audio: one encoder chunk, where the sample has three."""
    import soundfile as sf

    wave, rate = sf.read(sample_media["audio"])
    path = tmp_path_factory.mktemp("short") / "short.wav"
    sf.write(path, wave[: rate * 3 // 4], rate)
    return path


@pytest.fixture(scope="session")
def runtime_cpu():
    """The project's CPU runtime and patches in the test process (mindone's processor needs the kernels too)."""
    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.runtime import setup_runtime

    runtime = setup_runtime("CPU", seed=0)
    install_patches("CPU")
    return runtime


@pytest.fixture(scope="session")
def references():
    """transformers' PyTorch model on a checkpoint, loaded once per checkpoint: the yardstick."""
    from tests.reference import Reference

    loaded = {}

    def reference_for(checkpoint: Path):
        if checkpoint not in loaded:
            loaded[checkpoint] = Reference(checkpoint)
        return loaded[checkpoint]

    return reference_for


@pytest.fixture(scope="session")
def reference(references, tiny_checkpoint):
    """The reference on the tiny (Instruct-shaped) checkpoint."""
    return references(tiny_checkpoint)


@pytest.fixture(scope="session")
def mindone_model(tiny_checkpoint, runtime_cpu):
    """mindone's model on the tiny checkpoint (fp32, eager), for tests that only read it."""
    from omni_helpers.loading import load_model

    return load_model(tiny_checkpoint, "float32", "eager", with_talker=True)


@pytest.fixture(scope="session")
def tiny_plan(tiny_checkpoint, runtime_cpu):
    """scripts/plan_memory.py's plan for the tiny checkpoint on 2 ranks, in the tests' float32."""
    from scripts.plan_memory import plan

    return plan(str(tiny_checkpoint), world_size=2, dtype="float32")


@pytest.fixture(scope="session")
def mindone(tiny_checkpoint):
    """mindone's model set up and called as the scripts do (`tests.reference.MindOne`), shared by the modules
    that compare one of the project's paths with the path it replaces."""
    from tests.reference import MindOne

    return MindOne(tiny_checkpoint)


@pytest.fixture(scope="session")
def two_rows(tiny_checkpoint, mindone):  # mindone: runtime set up first
    """Two prompts of different lengths in one left-padded batch."""
    from tests.reference import batch_inputs

    conversations = [
        [{"role": "user", "content": "Describe the sound of a short sentence, then say it twice."}],
        [{"role": "user", "content": "Hi"}],
    ]
    return batch_inputs(tiny_checkpoint, conversations, False)
