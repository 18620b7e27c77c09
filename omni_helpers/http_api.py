"""The resident server's HTTP API, OpenAI-compatible: `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` (JSON, or server-sent chunks with `"stream": true`).

Every request is checked in the handler's thread before it is queued (the body, the
settings against the checkpoint, the media fetched and decoded), so a bad one is an HTTP
400 with `{"error": {"message", "type", "param"}}` and never reaches the model; a full
queue is a 429. The engine answers in arrival order (serving.Engine).
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from fastapi import Request as HttpRequest  # at module level: FastAPI reads the route's annotations from here

from .checkpoint import Checkpoint
from .errors import RequestError
from .openai_api import API_NAMES, chunk, completion, error_body, new_id, parse_chat_request, usage
from .outputs import wav_bytes
from .serving import Engine, Job, QueueFull
from .settings import GenerationSettings


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples as 16-bit little-endian PCM, what OpenAI streams speech as."""
    return np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()


class ChatCompletions:
    """What POST /v1/chat/completions does, apart from HTTP itself."""

    def __init__(self, engine: Engine, checkpoint: Checkpoint, model_name: str, defaults: GenerationSettings,
                 media_root: Path, allowed_local: Optional[Path], eos_token_id: int):  # fmt: skip
        self.engine, self.checkpoint, self.model_name, self.defaults = engine, checkpoint, model_name, defaults
        self.media_root, self.allowed_local, self.eos_token_id = media_root, allowed_local, eos_token_id

    def submit(self, body: Any) -> tuple[Job, bool, Path]:
        """Check the request, fetch and check its media, queue it. Raises RequestError or QueueFull."""
        folder = self.media_root / uuid.uuid4().hex
        try:
            chat = parse_chat_request(body, self.defaults, folder, self.allowed_local)
            job = self.engine.check_and_submit(chat.conversation, chat.settings, folder, API_NAMES,
                                               stream_audio=chat.stream and chat.settings.return_audio)  # fmt: skip
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job, chat.stream, folder

    def finish_reason(self, token_ids: list[int]) -> str:
        return "stop" if token_ids and token_ids[-1] == self.eos_token_id else "length"

    def whole(self, job: Job, request_id: str) -> dict[str, Any]:
        """Wait for the answer; the OpenAI completion object."""
        while True:
            kind, value = job.events.get()
            if kind == "error":
                raise value
            if kind == "done":
                answer = value
                wav = None if answer.waveform is None else wav_bytes(answer.waveform)
                return completion(request_id, self.model_name, answer.text, wav, self.finish_reason(answer.token_ids),
                                  usage(answer.metrics["prompt_tokens"], len(answer.token_ids)), answer.metrics)  # fmt: skip

    def chunks(self, job: Job, request_id: str) -> Iterator[str]:
        """Server-sent events: the role, then text and speech as they come, then the reason it ended and [DONE]."""
        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        yield event(chunk(request_id, self.model_name, {"role": "assistant", "content": ""}))
        audio_id = f"audio_{request_id}"
        while True:
            kind, value = job.events.get()
            if kind == "text":
                yield event(chunk(request_id, self.model_name, {"content": value}))
            elif kind == "audio":
                yield event(chunk(request_id, self.model_name, {"audio": {"id": audio_id, "data": base64.b64encode(pcm16(value)).decode()}}))
            elif kind == "error":  # after the stream began: say so in the stream, then end it
                yield event({"error": error_body(value, "server_error")["error"]})
                break
            elif kind == "done":
                answer = value
                yield event(chunk(request_id, self.model_name, {}, self.finish_reason(answer.token_ids),
                                  usage=usage(answer.metrics["prompt_tokens"], len(answer.token_ids)), metrics=answer.metrics))  # fmt: skip
                break
        yield "data: [DONE]\n\n"


def build_api(chat: ChatCompletions, health: dict[str, Any]):
    """The FastAPI app with the three routes (the browser UI is mounted on it by web_demo.py)."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="Qwen3-Omni on MindSpore", docs_url=None, redoc_url=None)

    def bad(error: RequestError, status: int = 400, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(error_body(error, kind), status_code=status)

    @app.get("/health")
    def get_health():
        return {"status": "ready", **health, **chat.engine.health()}

    @app.get("/v1/models")
    def get_models():
        return {"object": "list", "data": [{"id": chat.model_name, "object": "model", "created": 0, "owned_by": "qwen"}]}

    @app.post("/v1/chat/completions")
    async def post_chat_completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except ValueError as error:
            return bad(RequestError(f"the body is not valid JSON ({error})"))
        try:
            job, stream, folder = await run_in_threadpool(chat.submit, body)
        except RequestError as error:
            return bad(error)
        except QueueFull as error:
            return bad(RequestError(str(error)), 429, "rate_limit_error")
        request_id = new_id()
        first_kind, first = await run_in_threadpool(job.events.get)
        if first_kind == "error":  # rejected while preprocessing: never sent to the other ranks
            shutil.rmtree(folder, ignore_errors=True)
            return bad(first) if isinstance(first, RequestError) else bad(RequestError(str(first)), 500, "server_error")
        if stream:
            def events():
                try:
                    yield from chat.chunks(job, request_id)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            return await run_in_threadpool(chat.whole, job, request_id)
        except Exception as error:  # a fault during generation: the server ends after answering
            return bad(RequestError(str(error)), 500, "server_error")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return app
