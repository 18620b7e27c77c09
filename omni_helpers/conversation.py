"""Building the request: a conversation in the official Qwen3-Omni message format."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

Conversation = list[dict]
MEDIA_TYPES = ("image", "audio", "video")


def media_reference(path_or_url: str) -> str:
    """Local paths become absolute (qwen_omni_utils resolves them from the current directory);
    file:// and http(s):// pass through unchanged."""
    if "://" in path_or_url:
        return path_or_url
    return str(Path(path_or_url).expanduser().resolve())


def user_turn(
    prompt: Optional[str] = None,
    images: Iterable[str] = (),
    audios: Iterable[str] = (),
    videos: Iterable[str] = (),
    video_options: Optional[dict] = None,
) -> dict:
    """One user message: media first, then the text, as the official chat template renders it."""
    content = [{"type": "image", "image": media_reference(p)} for p in images]
    content += [{"type": "audio", "audio": media_reference(p)} for p in audios]
    content += [{"type": "video", "video": media_reference(p), **(video_options or {})} for p in videos]
    if prompt:
        content.append({"type": "text", "text": prompt})
    return {"role": "user", "content": content}


def with_system_prompt(conversation: Conversation, system_prompt: Optional[str]) -> Conversation:
    if not system_prompt:
        return conversation
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *conversation]


def media_in(conversation: Conversation) -> dict[str, list[str]]:
    """The media a conversation refers to, by type, for result.json."""
    found: dict[str, list[str]] = {kind: [] for kind in MEDIA_TYPES}
    for message in conversation:
        content = message.get("content")
        for item in content if isinstance(content, list) else []:
            if item.get("type") in MEDIA_TYPES:
                found[item["type"]].append(item[item["type"]])
    return found
