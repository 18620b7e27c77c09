"""Which checkpoint a name means: a folder, or a hub id already in the local cache, never a download."""

from __future__ import annotations

import json
import shutil

import pytest

from omni_helpers.request.checkpoint import resolve_checkpoint
from omni_helpers.request.errors import RequestError


def test_a_hub_id_in_the_local_cache_is_its_snapshot_folder(tiny_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    snapshot = cache / "models--Qwen--Qwen3-Omni-30B-A3B-Captioner" / "snapshots" / "0123abc"
    shutil.copytree(tiny_checkpoint, snapshot)
    (cache / "models--Qwen--Qwen3-Omni-30B-A3B-Captioner" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-Omni-30B-A3B-Captioner" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    checkpoint = resolve_checkpoint("Qwen/Qwen3-Omni-30B-A3B-Captioner")
    assert checkpoint.path == snapshot.resolve() and checkpoint.kind == "captioner"  # named by its hub id


def test_a_hub_id_not_downloaded_names_the_download_commands(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    with pytest.raises(RequestError, match="huggingface-cli download Qwen/Qwen3-Omni-30B-A3B-Thinking"):
        resolve_checkpoint("Qwen/Qwen3-Omni-30B-A3B-Thinking")


def test_kinds_follow_the_talker_and_the_name(tiny_checkpoint, tmp_path):
    assert resolve_checkpoint(str(tiny_checkpoint)).kind == "instruct"
    thinking = tmp_path / "my_model"
    shutil.copytree(tiny_checkpoint, thinking)
    config = json.loads((thinking / "config.json").read_text())
    (thinking / "config.json").write_text(json.dumps(dict(config, enable_audio_output=False)))
    assert resolve_checkpoint(str(thinking)).kind == "thinking"
    assert not resolve_checkpoint(str(thinking)).has_talker
