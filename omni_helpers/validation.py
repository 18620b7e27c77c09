"""Checking a request before anything heavy happens.

Loading the real checkpoint takes minutes on two NPUs; a typo must not surface as a
traceback after that. Everything here reads small files only (config.json, media
headers, the media themselves) and imports nothing of MindSpore, mindone or torch, so a
bad request is answered in about a second with one `RequestError` line naming the input
and the fix.
"""

from __future__ import annotations

import glob
from pathlib import Path

from .checkpoint import Checkpoint
from .conversation import Conversation, has_text, media_items
from .errors import RequestError
from .media import check_media, fetch_remote_media
from .requests import Request
from .settings import FLAG_NAMES, GenerationSettings


def ascend_npu_present() -> bool:
    """Ascend NPUs appear as /dev/davinci<N> (also inside containers, which must mount them)."""
    return bool(glob.glob("/dev/davinci[0-9]*"))


def check_device(device_target: str) -> None:
    if device_target == "Ascend" and not ascend_npu_present():
        raise RequestError(
            "--device_target Ascend: no Ascend NPU on this machine (no /dev/davinci* device); "
            "pass --device_target CPU to run on the CPU",
            "device_target",
        )


def check_settings(settings: GenerationSettings, checkpoint: Checkpoint, batch_size: int = 1,
                   names: dict[str, str] = FLAG_NAMES) -> None:  # fmt: skip
    """The settings make sense, and this checkpoint can do what they ask (`names`: how the user spelled each)."""
    settings.check(names)
    if settings.return_audio:
        speech, speaker = names["return_audio"], names["speaker"]
        if not checkpoint.has_talker:
            raise RequestError(
                f"{speech}: {checkpoint.name} has no talker (Thinking and Captioner speak no answer); "
                f"drop {speech} or use the Instruct checkpoint",
                speech.lstrip("-"),
            )
        if settings.speaker.lower() not in checkpoint.speakers:
            raise RequestError(
                f"{speaker} {settings.speaker}: not in this checkpoint; choose one of {', '.join(checkpoint.speakers)}",
                speaker.lstrip("-"),
            )
        if batch_size > 1:
            raise RequestError(
                f"{speech} with {names['batch_size']} {batch_size}: speech is generated one request at a time "
                f"(as in the reference); use {names['batch_size']} 1",
                names["batch_size"].lstrip("-"),
            )


def check_conversation_for(conversation: Conversation, checkpoint: Checkpoint, needs: str = "a prompt or media") -> None:
    """What this checkpoint accepts: anything for Instruct and Thinking, one audio and nothing else for the Captioner."""
    found = list(media_items(conversation))
    if not found and not has_text(conversation):
        raise RequestError(f"empty request: give {needs} (see --help)")
    if visual_kinds(conversation) == {"image", "video"}:
        raise RequestError(
            "images and videos in one request: the thinker cannot join their features (this fails in mindone 0.5.0 "
            "and in transformers 4.57.1 alike); ask about the images and the videos in separate requests",
            "messages",
        )
    if checkpoint.kind == "captioner":
        kinds = [item["type"] for item in found]
        if has_text(conversation) or kinds != ["audio"]:
            raise RequestError(
                f"{checkpoint.name} is the Captioner: it takes exactly one audio and no text or other media "
                f"(got {', '.join(kinds) or 'no media'}{' and text' if has_text(conversation) else ''}); "
                "give one --audio without --prompt, or use the Instruct checkpoint",
                "messages",
            )


def visual_kinds(conversation: Conversation) -> set[str]:
    """Which of images and videos a conversation holds (a forward can take one kind, not both)."""
    return {item["type"] for item in media_items(conversation)} & {"image", "video"}


def check_requests(
    requests: list[Request], checkpoint: Checkpoint, settings: GenerationSettings, media_folder: Path,
    needs: str = "a prompt or media",
) -> list[Request]:
    """Every request checked, its URLs fetched into `media_folder` and its media decoded;
    returns the requests as they will run (pointing at the fetched copies)."""
    checked = []
    for request in requests:
        check_conversation_for(request.conversation, checkpoint, needs)
        conversation = fetch_remote_media(request.conversation, media_folder)
        for item in media_items(conversation):
            check_media(item, settings.use_audio_in_video)
        checked.append(Request(request.id, conversation))
    return checked
