"""Which checkpoint a request names, and what it can do, from its config.json alone.

Nothing here downloads: a hub id must already be in the local cache (Hugging Face's or
ModelScope's). At 70 GB the released checkpoints are downloaded once, on purpose, with
the command the error names; several msrun ranks resolving a hub id at once would
otherwise race to download the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omni_helpers.request.errors import RequestError

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
KINDS = ("instruct", "thinking", "captioner")


@dataclass(frozen=True)
class Checkpoint:
    """A local Qwen3-Omni checkpoint folder and what its config says."""

    name: str  # as the user gave it (hub id or folder)
    path: Path  # the local folder
    config: dict

    @property
    def has_talker(self) -> bool:
        """Instruct has a talker and code2wav; Thinking and Captioner do not (enable_audio_output false)."""
        return bool(self.config.get("enable_audio_output", True)) and "talker_config" in self.config

    @property
    def speakers(self) -> list[str]:
        return sorted((self.config.get("talker_config") or {}).get("speaker_id") or {})

    @property
    def kind(self) -> str:
        """instruct, thinking or captioner. The released configs do not say which they are, their
        names do (Qwen3-Omni-30B-A3B-Captioner): a folder or hub id naming the Captioner is one."""
        if "captioner" in f"{self.name} {self.path.name}".lower():
            return "captioner"
        return "instruct" if self.has_talker else "thinking"


def looks_like_hub_id(model_name: str) -> bool:
    return model_name.count("/") == 1 and not model_name.startswith((".", "/", "~")) and not Path(model_name).exists()


def download_hint(repo_id: str) -> str:
    return (
        f"download it first: huggingface-cli download {repo_id} "
        f"(or: modelscope download --model {repo_id}), or pass the folder you downloaded it to"
    )


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The local folder of a hub id already in Hugging Face's or ModelScope's cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(found, str):
        return Path(found).parent
    modelscope_root = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope" / "hub"))
    for folder in (modelscope_root / "models" / repo_id, modelscope_root / repo_id):
        if (folder / "config.json").is_file():
            return folder
    return None


def resolve_checkpoint(model_name: str, allow_pickle_weights: bool = False) -> Checkpoint:
    """The checkpoint `model_name` names, checked: a Qwen3-Omni config and weights that load safely."""
    if looks_like_hub_id(model_name):
        path = cached_snapshot(model_name)
        if path is None:
            raise RequestError(
                f"--model_name {model_name}: not a local folder and not in the local cache; "
                + download_hint(model_name),
                "model_name",
            )
    else:
        path = Path(model_name).expanduser()
        if not path.is_dir():
            raise RequestError(
                f"--model_name {model_name}: no such directory; give a checkpoint directory or a hub id", "model_name"
            )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RequestError(
            f"--model_name {model_name}: no config.json in it; point at a Qwen3-Omni checkpoint directory", "model_name"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RequestError(
            f"--model_name {model_name}: config.json is unreadable ({error}); re-download the checkpoint", "model_name"
        ) from error
    if config.get("model_type") != "qwen3_omni_moe":
        raise RequestError(
            f"--model_name {model_name}: model_type is {config.get('model_type')!r}, not 'qwen3_omni_moe'; "
            "use a Qwen3-Omni checkpoint",
            "model_name",
        )
    check_weight_format(path, allow_pickle_weights)
    return Checkpoint(model_name, path.resolve(), config)


def check_weight_format(path: Path, allow_pickle_weights: bool) -> None:
    """Weights load from safetensors only: unpickling a .bin/.pt/.ckpt file runs code from it."""
    if any(path.glob("*.safetensors")) or allow_pickle_weights:
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise RequestError(
            f"--model_name {path}: only pickle weights ({', '.join(pickles[:3])}); loading them runs code from the "
            "file: convert them to safetensors, or pass --allow_pickle_weights if you trust the file",
            "model_name",
        )
    raise RequestError(
        f"--model_name {path}: no *.safetensors weights in it; download the full checkpoint", "model_name"
    )
