"""Requests from files: one conversation (`--conversation FILE`) or many (`--requests FILE.jsonl`).

Files are parsed as JSON, never evaluated. Relative media paths inside a file are taken
from the file's own folder, so a file and its media can move together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omni_helpers.request.conversation import Conversation, check_conversation, resolve_paths
from omni_helpers.request.errors import RequestError


@dataclass(frozen=True)
class Request:
    """One conversation to answer, and the id its answer is filed under."""

    id: str
    conversation: Conversation
    media_seconds: Optional[dict[str, float]] = field(default=None, compare=False)  # once checked (`check_requests`)


def _read_text(path: str, flag: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise RequestError(f"{flag} {path}: no such file; check the path", flag.lstrip("-"))
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RequestError(
            f"{flag} {path}: cannot be read ({error}); give a UTF-8 JSON file", flag.lstrip("-")
        ) from error


def load_conversation_file(path: str) -> Conversation:
    """A --conversation file: one JSON conversation in the official format."""
    try:
        conversation = json.loads(_read_text(path, "--conversation"))
    except ValueError as error:
        raise RequestError(f"--conversation {path}: not valid JSON ({error}); fix the file", "conversation") from error
    if isinstance(conversation, list) and conversation and all(isinstance(c, list) for c in conversation):
        raise RequestError(
            f"--conversation {path}: holds several conversations; give one, or use --requests FILE.jsonl for many",
            "conversation",
        )
    check_conversation(conversation, f"--conversation {path}")
    return resolve_paths(conversation, Path(path).resolve().parent)


def load_requests_file(path: str) -> list[Request]:
    """A --requests file: one JSON object per line, `{"id": ..., "conversation": [...]}`.

    Ids must be unique (they are how --resume knows what is done); a line without an id
    is numbered by its position (1, 2, ...). Blank lines are skipped.
    """
    requests, seen = [], set()
    base_dir = Path(path).resolve().parent
    for number, line in enumerate(_read_text(path, "--requests").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--requests {path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise RequestError(f"{where}: not valid JSON ({error}); one JSON object per line", "requests") from error
        if not isinstance(record, dict) or "conversation" not in record:
            raise RequestError(f'{where}: expected {{"id": ..., "conversation": [...]}}', "requests")
        request_id = str(record.get("id", number))
        if request_id in seen:
            raise RequestError(f"{where}: id {request_id!r} is used twice; give every request its own id", "requests")
        seen.add(request_id)
        check_conversation(record["conversation"], where)
        requests.append(Request(request_id, resolve_paths(record["conversation"], base_dir)))
    if not requests:
        raise RequestError(f"--requests {path}: no requests in it; one JSON object per line", "requests")
    return requests
