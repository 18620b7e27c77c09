"""Checking a request before anything heavy happens.

Loading the real checkpoint takes minutes on two NPUs; a typo must not surface as a
traceback after that. `check_request` reads only small files (the checkpoint's
config.json, the headers of the media) and raises `RequestError` with one line that
names the input and the fix. The scripts turn it into exit code 2 on every rank.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
CONTENT_TYPES = ("text", "image", "audio", "video")


class RequestError(ValueError):
    """A bad request; the message is one line naming the problem and the fix."""


def is_url(reference: str) -> bool:
    return reference.startswith(("http://", "https://"))


def local_path(reference: str) -> Optional[Path]:
    """The file a media reference names, or None for URLs (fetched only when generating)."""
    if is_url(reference) or reference.startswith("data:"):
        return None
    return Path(reference[len("file://") :] if reference.startswith("file://") else reference).expanduser()


# ----------------------------------------------------------------------------- checkpoint


def read_checkpoint_config(model_name: str, allow_pickle_weights: bool = False) -> Optional[dict]:
    """config.json of a local checkpoint directory (None for a hub id that is not a local path)."""
    path = Path(model_name).expanduser()
    looks_local = path.exists() or model_name.startswith((".", "/", "~")) or model_name.count("/") != 1
    if not looks_local:
        return None
    if not path.is_dir():
        raise RequestError(f"--model_name {model_name}: no such directory; give a checkpoint directory or a hub id")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RequestError(f"--model_name {model_name}: no config.json in it; point at a Qwen3-Omni checkpoint directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RequestError(f"--model_name {model_name}: config.json is unreadable ({error}); re-download the checkpoint") from error
    if config.get("model_type") != "qwen3_omni_moe":
        raise RequestError(
            f"--model_name {model_name}: model_type is {config.get('model_type')!r}, not 'qwen3_omni_moe'; "
            "use a Qwen3-Omni checkpoint"
        )
    check_weight_format(path, allow_pickle_weights)
    return config


def check_weight_format(path: Path, allow_pickle_weights: bool) -> None:
    """Weights load from safetensors only: unpickling a .bin/.pt/.ckpt file runs code from it."""
    if any(path.glob("*.safetensors")) or allow_pickle_weights:
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise RequestError(
            f"--model_name {path}: only pickle weights ({', '.join(pickles[:3])}); loading them runs code from the "
            "file: convert them to safetensors, or pass --allow_pickle_weights if you trust the file"
        )
    raise RequestError(f"--model_name {path}: no *.safetensors weights in it; download the full checkpoint")


def speakers_of(config: dict) -> list[str]:
    return sorted((config.get("talker_config") or {}).get("speaker_id") or {})


def has_talker(config: dict) -> bool:
    return bool(config.get("enable_audio_output", True)) and "talker_config" in config


# ----------------------------------------------------------------------------- media


def _probe_streams(path: Path) -> list[str]:
    """Stream kinds ffprobe finds in a file ([] if it cannot decode it)."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        raise RequestError("the ffprobe program is missing; install ffmpeg (apt-get install ffmpeg)")
    probe = subprocess.run(
        [ffprobe, "-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.stdout.split() if probe.returncode == 0 else []


def _check_readable(kind: str, reference: str) -> Optional[Path]:
    path = local_path(reference)
    if path is None:
        return None
    if not path.is_file():
        raise RequestError(f"{kind} {reference}: no such file; check the path")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise RequestError(f"{kind} {reference}: cannot be read ({error.strerror}); check its permissions") from error
    return path


def check_image(reference: str) -> None:
    path = _check_readable("image", reference)
    if path is None:
        return
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many kinds for broken files
        raise RequestError(f"image {reference}: not a readable image ({type(error).__name__}); give a PNG/JPEG file") from error


def check_audio(reference: str) -> None:
    path = _check_readable("audio", reference)
    if path is not None and "audio" not in _probe_streams(path):
        raise RequestError(f"audio {reference}: no decodable audio in it; give a WAV/FLAC/MP3 file")


def check_video(reference: str, use_audio_in_video: bool) -> None:
    path = _check_readable("video", reference)
    if path is None:
        return
    streams = _probe_streams(path)
    if "video" not in streams:
        raise RequestError(f"video {reference}: no decodable video in it (truncated or not a video?); give an MP4 file")
    if use_audio_in_video and "audio" not in streams:
        raise RequestError(f"video {reference}: it has no audio track; pass --no-use_audio_in_video to watch it silently")


# ----------------------------------------------------------------------------- conversations


def check_conversation(conversation, source: str) -> None:
    """The official message format: a list of {role, content}, content a string or a list of typed items."""
    if not isinstance(conversation, list) or not conversation:
        raise RequestError(f"{source}: expected a JSON list of messages like [{{\"role\": \"user\", \"content\": [...]}}]")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(f"{source}: message {i} needs a 'role' and a 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"{source}: message {i} has role {message['role']!r}; use system, user or assistant")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"{source}: message {i} content must be a string or a list of items")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in CONTENT_TYPES:
                raise RequestError(f"{source}: message {i} has an item of unknown type {kind!r}; use one of {', '.join(CONTENT_TYPES)}")
            if not isinstance(item.get(kind), str):
                raise RequestError(f"{source}: message {i} has a {kind} item without its '{kind}' field")


def load_conversation_file(path: str) -> list:
    """Parse a --conversation file (JSON only; nothing in it is evaluated) and check its format."""
    file = Path(path)
    if not file.is_file():
        raise RequestError(f"--conversation {path}: no such file; check the path")
    try:
        conversation = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise RequestError(f"--conversation {path}: not valid JSON ({error}); fix the file") from error
    if isinstance(conversation, list) and conversation and all(isinstance(c, list) for c in conversation):
        raise RequestError(f"--conversation {path}: holds several conversations; give one per run")
    check_conversation(conversation, f"--conversation {path}")
    return conversation


def media_items(conversation: list) -> Iterable[tuple[str, str]]:
    for message in conversation:
        content = message["content"]
        for item in content if isinstance(content, list) else []:
            if item["type"] != "text":
                yield item["type"], item[item["type"]]


def has_text(conversation: list) -> bool:
    for message in conversation:
        content = message["content"]
        if isinstance(content, str) and content.strip():
            return True
        if isinstance(content, list) and any(i["type"] == "text" and i["text"].strip() for i in content):
            return True
    return False


# ----------------------------------------------------------------------------- the whole request


def check_request(args: argparse.Namespace, conversations: list[list], needs: str = "prompt or media") -> None:
    """Check every flag and file of a request; raise RequestError on the first problem."""
    if args.max_new_tokens <= 0:
        raise RequestError(f"--max_new_tokens {args.max_new_tokens}: must be positive")
    if args.min_pixels > args.max_pixels:
        raise RequestError(f"--min_pixels {args.min_pixels} is greater than --max_pixels {args.max_pixels}; swap or lower it")
    return_audio = getattr(args, "return_audio", False)
    if return_audio and getattr(args, "talker_max_new_tokens", 1) <= 0:
        raise RequestError(f"--talker_max_new_tokens {args.talker_max_new_tokens}: must be positive")

    config = read_checkpoint_config(args.model_name, getattr(args, "allow_pickle_weights", False))
    if return_audio and config is not None:
        if not has_talker(config):
            raise RequestError(
                f"--return_audio: {args.model_name} has no talker (Thinking and Captioner speak no answer); "
                "drop --return_audio or use the Instruct checkpoint"
            )
        speakers = speakers_of(config)
        if args.speaker.lower() not in speakers:
            raise RequestError(f"--speaker {args.speaker}: not in this checkpoint; choose one of {', '.join(speakers)}")
    if return_audio and len(conversations) > 1:
        raise RequestError("--return_audio: speech is generated for one request at a time; send one request per run")

    use_audio_in_video = getattr(args, "use_audio_in_video", False)
    for conversation in conversations:
        items = list(media_items(conversation))
        if not items and not has_text(conversation):
            raise RequestError(f"empty request: give a {needs} (see --help)")
        for kind, reference in items:
            if kind == "image":
                check_image(reference)
            elif kind == "audio":
                check_audio(reference)
            else:
                check_video(reference, use_audio_in_video)


def exit_on_bad_request(build):
    """Return `build()`; on RequestError print one line to stderr and exit 2 (every msrun rank does the same)."""
    try:
        return build()
    except RequestError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
