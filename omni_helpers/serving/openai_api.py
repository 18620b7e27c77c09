"""The OpenAI Chat Completions conventions, for the server: a request body to a conversation
and settings, an answer to a response or to server-sent chunks. Imports nothing heavy.

Content parts: `text`, `image_url` ({"url"}), `input_audio` ({"data": base64, "format":
"wav" | "mp3"}) and `video_url` ({"url"}). URLs may be `data:` (always), `http(s)://`
(fetched before the request is queued), or local paths and `file://` only inside the folder
the operator allowed (`--allowed_local_media_path`). `modalities: ["text", "audio"]` asks
for speech, `audio: {"voice", "format": "wav"}` chooses the voice, and `talker_max_new_tokens`
(an extension of this server's) caps the speech in codec frames, 12.5 per second, within the
server's own --talker_max_new_tokens. Extensions too: `talker_do_sample` (true: speech sampled as
the released model samples it), `talker_temperature`, `talker_top_k`, `talker_top_p` and
`talker_repetition_penalty`; each absent field is the server's flag of the same name.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omni_helpers.request.conversation import Conversation, local_path
from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings

AUDIO_FORMATS = ("wav", "mp3")
# How each generation setting is spelled in a Chat Completions request (errors name these).
API_NAMES = {
    "max_new_tokens": "max_tokens",
    "talker_max_new_tokens": "talker_max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "talker_temperature": "talker_temperature",
    "talker_top_k": "talker_top_k",
    "talker_top_p": "talker_top_p",
    "talker_repetition_penalty": "talker_repetition_penalty",
    "speaker": "audio.voice",
    "return_audio": 'modalities ["text", "audio"]',
    "batch_size": "n",
}


@dataclass(frozen=True)
class ChatRequest:
    conversation: Conversation
    settings: GenerationSettings
    stream: bool


def _field(body: dict, name: str, kinds, default=None):
    value = body.get(name, default)
    if value is not None and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
        raise RequestError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, not {type(value).__name__}", name)
    return value


def local_media(reference: str, allowed: Optional[Path], param: str) -> str:
    """A local path (or file:// URL) as the file it names, if it lies inside the allowed folder."""
    if allowed is None:
        raise RequestError(
            f"{reference}: local files are not served; send the file as a data: URL or an http(s) URL "
            "(or start the server with --allowed_local_media_path DIR)",
            param,
        )
    path = local_path(reference)
    resolved = (allowed / path).resolve() if not path.is_absolute() else path.resolve()
    if not resolved.is_relative_to(allowed.resolve()):
        raise RequestError(f"{reference}: outside the folder this server may read (--allowed_local_media_path)", param)
    return str(resolved)


def media_url(part: dict, kind: str, allowed: Optional[Path], param: str) -> str:
    holder = part.get(f"{kind}_url")
    url = holder.get("url") if isinstance(holder, dict) else holder
    if not isinstance(url, str) or not url:
        raise RequestError(f'a {kind}_url part needs {{"url": ...}}', param)
    if url.startswith(("data:", "http://", "https://")):
        return url
    return local_media(url, allowed, param)


def audio_file(part: dict, folder: Path, param: str) -> str:
    """An input_audio part, written to a file of the request's own."""
    audio = part.get("input_audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise RequestError('an input_audio part needs {"data": base64, "format": "wav" or "mp3"}', param)
    if audio.get("format", "wav") not in AUDIO_FORMATS:
        raise RequestError(f"input_audio format {audio.get('format')!r}: use wav or mp3", f"{param}.format")
    try:
        data = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"input_audio data is not valid base64 ({error})", f"{param}.data") from error
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"input_audio_{uuid.uuid4().hex[:8]}.{audio.get('format', 'wav')}"
    path.write_bytes(data)
    return str(path)


def content_items(content, folder: Path, allowed: Optional[Path], param: str) -> list[dict]:
    """OpenAI content (a string or parts) as the official Qwen3-Omni items, media first as its template expects."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError("content must be a string or a list of parts", param)
    media, texts = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError("a text part needs a string 'text'", f"{where}.text")
            texts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            media.append({"type": "image", "image": media_url(part, "image", allowed, where)})
        elif kind == "video_url":
            media.append({"type": "video", "video": media_url(part, "video", allowed, where)})
        elif kind == "input_audio":
            media.append({"type": "audio", "audio": audio_file(part, folder, where)})
        else:
            raise RequestError(
                f"content part type {kind!r} is not supported; use text, image_url, input_audio or video_url",
                f"{where}.type",
            )
    return media + texts


def parse_chat_request(body, defaults: GenerationSettings, folder: Path, allowed: Optional[Path]) -> ChatRequest:
    """A Chat Completions body as a conversation and settings; raises RequestError (HTTP 400)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError("each message needs a role: system, user or assistant", f"messages[{i}].role")
        if message.get("content") is None:  # an assistant turn that only spoke
            continue
        role = "system" if message["role"] == "developer" else message["role"]
        conversation.append(
            {"role": role, "content": content_items(message["content"], folder, allowed, f"messages[{i}].content")}
        )

    modalities = _field(body, "modalities", (list,), ["text"])
    if not set(modalities) <= {"text", "audio"} or "text" not in modalities:
        raise RequestError(f'modalities {modalities}: use ["text"] or ["text", "audio"]', "modalities")
    audio = _field(body, "audio", (dict,), {}) or {}
    if audio.get("format", "wav") != "wav":
        raise RequestError(f"audio format {audio.get('format')!r}: this server speaks wav", "audio.format")
    max_tokens = _field(
        body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,), defaults.max_new_tokens)
    )
    talker_frames = _field(body, "talker_max_new_tokens", (int,), defaults.talker_max_new_tokens)
    temperature = _field(body, "temperature", (int, float), None)
    top_p = _field(body, "top_p", (int, float), None)
    top_k = _field(body, "top_k", (int,), None)
    seed = _field(body, "seed", (int,), None)
    sampling = temperature is not None and temperature > 0 or (temperature is None and defaults.do_sample)
    settings = defaults.replace(
        max_new_tokens=max_tokens,
        talker_max_new_tokens=talker_frames,
        do_sample=sampling,  # no temperature: the server's default; temperature 0: greedy
        temperature=defaults.temperature if temperature in (None, 0) else float(temperature),
        top_p=defaults.top_p if top_p is None else float(top_p),
        top_k=defaults.top_k if top_k is None else top_k,
        return_audio="audio" in modalities,
        speaker=audio.get("voice", defaults.speaker),
        seed=seed,
        **speech_sampling(body, defaults),
    )
    return ChatRequest(conversation, settings, bool(_field(body, "stream", (bool,), False)))


def speech_sampling(body: dict, defaults: GenerationSettings) -> dict[str, Any]:
    """The request's own talker sampling fields (this server's extensions), the server's where absent."""
    return {
        "talker_do_sample": _field(body, "talker_do_sample", (bool,), defaults.talker_do_sample),
        "talker_temperature": float(_field(body, "talker_temperature", (int, float), defaults.talker_temperature)),
        "talker_top_k": _field(body, "talker_top_k", (int,), defaults.talker_top_k),
        "talker_top_p": float(_field(body, "talker_top_p", (int, float), defaults.talker_top_p)),
        "talker_repetition_penalty": float(
            _field(body, "talker_repetition_penalty", (int, float), defaults.talker_repetition_penalty)
        ),
    }


# ----------------------------------------------------------------------------- responses


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def error_body(error: Exception, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": str(error), "type": kind, "param": getattr(error, "param", None), "code": None}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str, model: str, text: str, wav: Optional[bytes], finish_reason: str, usage_: dict, metrics: dict
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if wav is not None:
        message["audio"] = {
            "id": f"audio_{request_id}",
            "data": base64.b64encode(wav).decode(),
            "expires_at": int(time.time()) + 3600,
            "transcript": text,
        }
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage_,
        "metrics": metrics,
    }


def chunk(request_id: str, model: str, delta: dict, finish_reason: Optional[str] = None, **extra) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }
