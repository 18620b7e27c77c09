"""Checking a request before anything heavy happens.

Loading the real checkpoint takes minutes on two NPUs; a typo must not surface as a
traceback after that. Everything here reads small files only (config.json, media
headers, the media themselves) and imports nothing of MindSpore, mindone or torch, so a
bad request is answered in about a second with one `RequestError` line naming the input
and the fix.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omni_helpers.request.checkpoint import Checkpoint
from omni_helpers.request.conversation import Conversation, has_text, media_items
from omni_helpers.request.errors import RequestError
from omni_helpers.request.media import check_media, fetch_remote_media
from omni_helpers.request.request_files import Request
from omni_helpers.request.settings import FLAG_NAMES, GenerationSettings


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


def check_settings(
    settings: GenerationSettings, checkpoint: Checkpoint, batch_size: int = 1, names: dict[str, str] = FLAG_NAMES
) -> None:
    """The settings make sense, and this checkpoint can do what they ask (`names`: how the user spelled each)."""
    settings.check(names)
    check_context(settings, Context.of(checkpoint.config), names=names)
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


@dataclass(frozen=True)
class RequestLimits:
    """What one request to the server may hold (web_demo.py's flags); the context check comes after these."""

    audio_seconds: float = 2400.0  # 40 minutes: at 13 audio tokens a second, 31,200 of the released 32,768 positions
    video_seconds: float = 120.0  # the longest video in the released model's memory table (2 frames a second)
    media_items: int = 64
    turns: int = 128

    def check(self) -> None:
        for setting, flag in LIMIT_FLAGS.items():
            if getattr(self, setting) <= 0:
                raise RequestError(f"{flag} {getattr(self, setting)}: must be positive")


LIMIT_FLAGS = {
    "audio_seconds": "--max_audio_seconds",
    "video_seconds": "--max_video_seconds",
    "media_items": "--max_media_items",
    "turns": "--max_turns",
}


def beyond(limits: RequestLimits, setting: str, what: str) -> RequestError:
    limit, flag = getattr(limits, setting), LIMIT_FLAGS[setting]
    return RequestError(
        f"{what}: above this server's limit of {limit:g} (its {flag}); send less, or ask separately", "messages"
    )


def check_request_size(conversation: Conversation, limits: RequestLimits) -> None:
    """The turns and media items of a request within the server's limits (before any media is fetched)."""
    items = sum(1 for _ in media_items(conversation))
    if len(conversation) > limits.turns:
        raise beyond(limits, "turns", f"{len(conversation)} messages in this request")
    if items > limits.media_items:
        raise beyond(limits, "media_items", f"{items} images, audio and video items in this request")


def check_request_seconds(seconds: dict[str, float], limits: RequestLimits) -> None:
    """The seconds of audio and video of a request (`Request.media_seconds`, counted by `check_requests`)
    within the server's limits."""
    for kind in ("audio", "video"):
        if seconds[kind] > getattr(limits, f"{kind}_seconds"):
            raise beyond(limits, f"{kind}_seconds", f"{seconds[kind]:.1f} s of {kind} in this request")


# The talker's prompt is the user turns (at most the thinker's prompt) plus the assistant's prefix: its role,
# the speaker and the codec's start, 9 positions in the released model; the answer's text rides on its steps.
TALKER_PREFIX_POSITIONS = 16


@dataclass(frozen=True)
class Context:
    """How many positions the thinker and the talker can hold (their max_position_embeddings): the prompt and
    everything generated after it must fit, or the caches a generation allocates for it outgrow what was trained."""

    thinker: int
    talker: Optional[int]  # None: no talker

    @classmethod
    def of(cls, config: dict) -> "Context":
        """From a checkpoint's config.json (or a loaded model's `config.to_dict()`)."""
        talker = (config.get("talker_config") or {}).get("text_config") or {}
        return cls(
            config["thinker_config"]["text_config"]["max_position_embeddings"], talker.get("max_position_embeddings")
        )


def check_context(
    settings: GenerationSettings, context: Context, prompt_tokens: int = 0, names: dict[str, str] = FLAG_NAMES
) -> None:
    """The prompt (when known) and the tokens and frames asked for fit the model's context; checked before any
    cache is allocated: once with the settings alone, again once the processor has counted the prompt."""

    def too_many(setting: str, value: int, limit: int, what: str):
        room = limit - prompt_tokens - (TALKER_PREFIX_POSITIONS if setting == "talker_max_new_tokens" else 0)
        prompt = f" and this prompt takes {prompt_tokens}" if prompt_tokens else ""
        raise RequestError(
            f"{names[setting]} {value}: the {what} holds {limit} positions (max_position_embeddings){prompt}; "
            f"ask for at most {room}",
            names[setting].lstrip("-"),
        )

    if prompt_tokens >= context.thinker:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens, more than the thinker's context of {context.thinker} "
            "positions; shorten it (less text, fewer or shorter media, fewer pixels)",
            "messages",
        )
    if prompt_tokens + settings.max_new_tokens > context.thinker:
        too_many("max_new_tokens", settings.max_new_tokens, context.thinker, "thinker's context")
    if settings.return_audio and context.talker is not None:
        if prompt_tokens + TALKER_PREFIX_POSITIONS + settings.talker_max_new_tokens > context.talker:
            too_many("talker_max_new_tokens", settings.talker_max_new_tokens, context.talker, "talker's context")


def check_server_limits(settings: GenerationSettings, limits: GenerationSettings, names: dict[str, str]) -> None:
    """A server's --max_new_tokens and --talker_max_new_tokens are ceilings as well as defaults."""
    for setting, flag in (("max_new_tokens", "--max_new_tokens"), ("talker_max_new_tokens", "--talker_max_new_tokens")):
        value, limit = getattr(settings, setting), getattr(limits, setting)
        if value > limit and (setting == "max_new_tokens" or settings.return_audio):
            raise RequestError(
                f"{names[setting]} {value}: above this server's limit of {limit} (its {flag}); ask for at most {limit}",
                names[setting].lstrip("-"),
            )


def check_conversation_for(
    conversation: Conversation, checkpoint: Checkpoint, needs: str = "a prompt or media"
) -> None:
    """What this checkpoint accepts: anything for Instruct and Thinking, one audio and nothing else for the
    Captioner."""
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
    requests: list[Request],
    checkpoint: Checkpoint,
    settings: GenerationSettings,
    media_folder: Path,
    needs: str = "a prompt or media",
) -> list[Request]:
    """Every request checked, its URLs fetched into `media_folder` and its media decoded;
    returns the requests as they will run (pointing at the fetched copies), each with the
    seconds of audio and video it holds."""
    checked = []
    for request in requests:
        check_conversation_for(request.conversation, checkpoint, needs)
        conversation = fetch_remote_media(request.conversation, media_folder)
        seconds = {"audio": 0.0, "video": 0.0}
        for item in media_items(conversation):
            for kind, used in check_media(item, settings.use_audio_in_video).items():
                seconds[kind] += used
        checked.append(Request(request.id, conversation, seconds))
    return checked
