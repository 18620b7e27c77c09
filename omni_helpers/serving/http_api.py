"""The resident server's HTTP API, OpenAI-compatible: `GET /health`, `GET /v1/models`,
`POST /v1/chat/completions` (JSON, or server-sent chunks with `"stream": true`).

Every request is checked in the handler's thread before it is queued (the body, the
settings against the checkpoint and the server's limits, the media fetched and decoded), so
a bad one is an HTTP 400 with `{"error": {"message", "type", "param", "code"}}` and never
reaches the model; a full queue is a 429, a model still loading a 503, a fault inside a
generation a 500. Every other error has the same shape: an unknown route 404, a known route
with the wrong method 405. A client that disconnects cancels its request (serving.Job.cancel):
skipped if it waits, stopped at the next decoding step if it runs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import numpy as np
from fastapi import Request as HttpRequest  # at module level: FastAPI reads the route's annotations from here

from omni_helpers.outputs.files import wav_bytes
from omni_helpers.request.checkpoint import Checkpoint
from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.serving.engine import Arrival, Engine, GenerationFailed, Job, NotReady, QueueFull
from omni_helpers.serving.openai_api import API_NAMES, chunk, completion, error_body, new_id, parse_chat_request, usage

# The API's routes and their methods: anything else under them gets the API's own 404 or 405 (the browser UI,
# mounted at "/", would otherwise answer with its own 404).
ROUTES = {"/health": ("GET",), "/v1/models": ("GET",), "/v1/chat/completions": ("POST",)}


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples as 16-bit little-endian PCM, what OpenAI streams speech as."""
    return np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()


async def next_event(job: Job, timeout: Optional[float] = None) -> tuple[str, Any]:
    """The job's next event, waited for in a worker thread (the engine's thread puts them); queue.Empty after
    `timeout` seconds without one. A caller that is cancelled (its client gone) stops waiting at once, and the
    thread ends with the job's next event (which nobody wants any more)."""
    import anyio.to_thread

    return await anyio.to_thread.run_sync(lambda: job.events.get(timeout=timeout), abandon_on_cancel=True)


async def cancel_on_disconnect(http: HttpRequest, job: Job) -> None:
    """Cancel `job` when its client disconnects (the body has been read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class ChatCompletions:
    """What POST /v1/chat/completions does, apart from HTTP itself."""

    def __init__(
        self,
        engine: Engine,
        checkpoint: Checkpoint,
        model_name: str,
        defaults: GenerationSettings,
        media_root: Path,
        allowed_local: Optional[Path],
        eos_token_id: int,
    ):
        self.engine, self.checkpoint, self.model_name, self.defaults = engine, checkpoint, model_name, defaults
        self.media_root, self.allowed_local, self.eos_token_id = media_root, allowed_local, eos_token_id

    def submit(self, body: Any, arrival: Optional[Arrival] = None) -> tuple[Job, bool, Path]:
        """Check the request, fetch and check its media, queue it (`arrival`: the request's, ended as it is
        queued). Raises RequestError, QueueFull or NotReady."""
        folder = self.media_root / uuid.uuid4().hex
        try:
            chat = parse_chat_request(body, self.defaults, folder, self.allowed_local)
            job = self.engine.check_and_submit(
                chat.conversation,
                chat.settings,
                folder,
                API_NAMES,
                stream_audio=chat.stream and chat.settings.return_audio,
                arrival=arrival,
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job, chat.stream, folder

    def finish_reason(self, token_ids: list[int]) -> str:
        return "stop" if token_ids and token_ids[-1] == self.eos_token_id else "length"

    async def whole(self, job: Job, request_id: str) -> dict[str, Any]:
        """Wait for the answer; the OpenAI completion object. Raises the job's error."""
        while True:
            kind, value = await next_event(job)
            if kind == "error":
                raise value
            if kind == "cancelled":
                raise GenerationFailed("the request was cancelled")
            if kind == "done":
                answer = value
                wav = None if answer.waveform is None else wav_bytes(answer.waveform)
                return completion(
                    request_id,
                    self.model_name,
                    answer.text,
                    wav,
                    self.finish_reason(answer.token_ids),
                    usage(answer.metrics["prompt_tokens"], len(answer.token_ids)),
                    answer.metrics,
                )

    async def chunks(self, job: Job, request_id: str) -> AsyncIterator[str]:
        """Server-sent events: the role, then text and speech as they come, then the reason it ended and [DONE]."""

        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        yield event(chunk(request_id, self.model_name, {"role": "assistant", "content": ""}))
        audio_id = f"audio_{request_id}"
        while True:
            kind, value = await next_event(job)
            if kind == "text":
                yield event(chunk(request_id, self.model_name, {"content": value}))
            elif kind == "audio":
                yield event(
                    chunk(
                        request_id,
                        self.model_name,
                        {"audio": {"id": audio_id, "data": base64.b64encode(pcm16(value)).decode()}},
                    )
                )
            elif kind in ("error", "cancelled"):  # after the stream began: say so in the stream, then end it
                error = value if kind == "error" else GenerationFailed("the request was cancelled")
                yield event({"error": error_body(error, "server_error")["error"]})
                break
            elif kind == "done":
                answer = value
                yield event(
                    chunk(
                        request_id,
                        self.model_name,
                        {},
                        self.finish_reason(answer.token_ids),
                        usage=usage(answer.metrics["prompt_tokens"], len(answer.token_ids)),
                        metrics=answer.metrics,
                    )
                )
                break
        yield "data: [DONE]\n\n"


def failure(error: Exception):
    """The HTTP response for an error a request met: 400 for a bad request, 500 for a fault."""
    from fastapi.responses import JSONResponse

    if isinstance(error, RequestError):
        return JSONResponse(error_body(error), status_code=400)
    return JSONResponse(error_body(error, "server_error"), status_code=500)


def build_api(chat: ChatCompletions, health: dict[str, Any]):
    """The FastAPI app with the three routes (web_demo.py mounts the browser UI on it, then wraps it in `ApiErrors`)."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="Qwen3-Omni on MindSpore", docs_url=None, redoc_url=None, openapi_url=None)

    def bad(error: Exception, status: int = 400, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(error_body(error, kind), status_code=status)

    @app.get("/health")
    def get_health():
        state = chat.engine.health()
        return {"status": "ready" if state["ready"] else "loading", **health, **state}

    @app.get("/v1/models")
    def get_models():
        return {
            "object": "list",
            "data": [{"id": chat.model_name, "object": "model", "created": 0, "owned_by": "qwen"}],
        }

    @app.post("/v1/chat/completions")
    async def post_chat_completions(http: HttpRequest):
        # counted as arriving from here, while its body (media inline, often) is read and decoded: clients asking
        # at once are then answered in one batch, where one still sending would otherwise miss it
        with chat.engine.arrival() as arrival:
            try:
                body = json.loads(await http.body())
            except ValueError as error:
                return bad(RequestError(f"the body is not valid JSON ({error})"))
            try:
                job, stream, folder = await run_in_threadpool(chat.submit, body, arrival)
            except RequestError as error:
                return bad(error)
            except QueueFull as error:
                return bad(error, 429, "rate_limit_error")
            except NotReady as error:
                return bad(error, 503, "unavailable_error")
        watcher = asyncio.create_task(cancel_on_disconnect(http, job))
        streaming = False
        try:
            request_id = new_id()
            first_kind, first = await next_event(job)
            if first_kind in ("error", "cancelled"):  # rejected while preprocessing, or its client left while it waited
                return failure(first if first_kind == "error" else GenerationFailed("the request was cancelled"))
            if stream:

                async def events():
                    try:
                        async for line in chat.chunks(job, request_id):
                            yield line
                    finally:  # the stream ended, or its client went away: nothing more to generate for it
                        job.cancel()
                        watcher.cancel()
                        shutil.rmtree(folder, ignore_errors=True)

                streaming = True
                return StreamingResponse(events(), media_type="text/event-stream")
            try:
                return await chat.whole(job, request_id)
            except Exception as error:
                return failure(error)
        finally:
            if not streaming:
                watcher.cancel()
                shutil.rmtree(folder, ignore_errors=True)

    return app


class ApiErrors:
    """ASGI middleware: the API's error shape for every 404 and 405. The browser UI is mounted at "/", so it
    answers any path or method the API's routes do not match, with its own 404: a known route with another
    method becomes a 405 naming the methods it takes, any other 404 gets `{"error": {...}}`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replaced = False

        async def send_or_replace(message):
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                replaced = True
            if not replaced:
                return await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self.send_error(scope, send)

        await self.app(scope, receive, send_or_replace)

    @staticmethod
    async def send_error(scope, send) -> None:
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        allowed = ROUTES.get(path)
        if allowed and method not in allowed:
            status, message = 405, f"{method} {path}: use {' or '.join(allowed)}"
            headers = [(b"allow", ", ".join(allowed).encode())]
        else:
            status, headers = 404, []
            message = f"{method} {path}: no such route; the API has {', '.join(f'{m} {r}' for r, ms in ROUTES.items() for m in ms)}"
        error = RequestError(message)
        kind = "invalid_request_error" if status == 405 else "not_found_error"
        body = json.dumps(error_body(error, kind)).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
