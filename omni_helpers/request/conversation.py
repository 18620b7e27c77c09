"""Conversations in the official Qwen3-Omni message format: building, checking, reading.

A conversation is a list of `{"role", "content"}` messages; content is a string or a
list of typed items (`{"type": "image", "image": "cars.jpg"}`, `{"type": "text", ...}`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

from omni_helpers.request.errors import RequestError

Conversation = list[dict]
MEDIA_TYPES = ("image", "audio", "video")
CONTENT_TYPES = ("text", *MEDIA_TYPES)
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- building


def user_turn(
    prompt: Optional[str] = None,
    images: Iterable[str] = (),
    audios: Iterable[str] = (),
    videos: Iterable[str] = (),
    video_options: Optional[dict] = None,
) -> dict:
    """One user message: media first, then the text, as the official chat template renders it."""
    content = [{"type": "image", "image": p} for p in images]
    content += [{"type": "audio", "audio": p} for p in audios]
    content += [{"type": "video", "video": p, **(video_options or {})} for p in videos]
    if prompt:
        content.append({"type": "text", "text": prompt})
    return {"role": "user", "content": content}


def with_system_prompt(conversation: Conversation, system_prompt: Optional[str]) -> Conversation:
    if not system_prompt:
        return conversation
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *conversation]


# ----------------------------------------------------------------------------- reading


def items(conversation: Conversation) -> Iterator[dict]:
    """Every typed content item, in order (string contents have none)."""
    for message in conversation:
        content = message["content"]
        yield from content if isinstance(content, list) else []


def media_items(conversation: Conversation) -> Iterator[dict]:
    return (item for item in items(conversation) if item["type"] in MEDIA_TYPES)


def has_text(conversation: Conversation) -> bool:
    """Whether any message carries text (a prompt, a system message, an earlier answer)."""
    for message in conversation:
        if isinstance(message["content"], str) and message["content"].strip():
            return True
    return any(item["type"] == "text" and item["text"].strip() for item in items(conversation))


def media_in(conversation: Conversation) -> dict[str, list[str]]:
    """The media a conversation refers to, by type, for result.json."""
    found: dict[str, list[str]] = {kind: [] for kind in MEDIA_TYPES}
    for item in media_items(conversation):
        found[item["type"]].append(item[item["type"]])
    return found


def map_media(conversation: Conversation, change) -> Conversation:
    """A copy of `conversation` with each media item replaced by `change(item)`."""
    copied = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [change(dict(item)) if item["type"] in MEDIA_TYPES else item for item in content]
        copied.append({**message, "content": content})
    return copied


def local_path(reference: str) -> Path:
    """The file a local media reference names: a path, or a file:// URL."""
    return Path(reference[len("file://") :] if reference.startswith("file://") else reference).expanduser()


def resolve_paths(conversation: Conversation, base_dir: Path) -> Conversation:
    """Local media paths made absolute, relative ones taken from `base_dir` (a conversation
    file's folder, or the working directory for flags); URLs are left as they are."""

    def resolve(item: dict) -> dict:
        reference = item[item["type"]]
        if reference.startswith("data:") or ("://" in reference and not reference.startswith("file://")):
            return item
        item[item["type"]] = str((base_dir / local_path(reference)).resolve())
        return item

    return map_media(conversation, resolve)


# ----------------------------------------------------------------------------- checking


def check_conversation(conversation, source: str) -> None:
    """The official message format: a list of {role, content}, content a string or a list of typed items."""
    if not isinstance(conversation, list) or not conversation:
        raise RequestError(f'{source}: expected a JSON list of messages like [{{"role": "user", "content": [...]}}]')
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(f"{source}: message {i} needs a 'role' and a 'content'")
        if message["role"] not in ROLES:
            raise RequestError(f"{source}: message {i} has role {message['role']!r}; use system, user or assistant")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"{source}: message {i} content must be a string or a list of items")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in CONTENT_TYPES:
                raise RequestError(
                    f"{source}: message {i} has an item of unknown type {kind!r}; use one of {', '.join(CONTENT_TYPES)}"
                )
            if not isinstance(item.get(kind), str):
                raise RequestError(f"{source}: message {i} has a {kind} item without its '{kind}' field")
