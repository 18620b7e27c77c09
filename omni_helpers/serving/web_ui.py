"""The resident server's browser UI (Gradio), in the manner of Qwen's own web demo: a chat with
history, text, uploaded images, audio and video, microphone recordings, the checkpoint's
voices, a "speak the answer" switch with a limit on the speech's length (only for checkpoints
with a talker), sampling settings, and a Stop button.

Each turn sends the whole conversation so far to the engine, earlier media and answers
included. A file that cannot be used (corrupt, unsupported, too short a clip) is answered
with a message in the chat; the server goes on. One answer at a time per browser tab: a
question sent while an answer is still coming is refused with a message and stays in the
box. Stop, or closing the tab, cancels the answer at its next decoding step.
"""

from __future__ import annotations

import math
import mimetypes
import queue
import threading
import uuid
from pathlib import Path

import anyio.to_thread
import gradio as gr  # at module level: Gradio reads the handlers' annotations (gr.Request) from here

from omni_helpers.generation.speech_stream import SPEECH_SAMPLE_RATE
from omni_helpers.outputs.files import write_wav
from omni_helpers.request.checkpoint import Checkpoint
from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.serving.engine import Engine, Job, NotReady, QueueFull
from omni_helpers.serving.http_api import next_event

KINDS_BY_MIME = {"image": "image", "audio": "audio", "video": "video"}
UI_NAMES = {
    "max_new_tokens": "max new tokens",
    "talker_max_new_tokens": "speech limit",
    "temperature": "temperature",
    "top_p": "top p",
    "top_k": "--top_k",
    "speaker": "voice",
    "return_audio": '"speak the answer"',
    "batch_size": "batch size",
}
FRAMES_PER_SECOND = SPEECH_SAMPLE_RATE / 1920  # a codec frame is 1920 samples: 12.5 frames per second of speech
STILL_ANSWERING = (
    "An answer is still coming: your question stays in the box; send it once the answer ends, or press Stop."
)
HEARTBEAT_SECONDS = 1.0  # an answer with nothing new to show yields this often, so that a closed tab is noticed


def media_kind(path: str) -> str:
    kind = KINDS_BY_MIME.get((mimetypes.guess_type(path)[0] or "").split("/")[0])
    if kind is None:
        raise RequestError(f"{Path(path).name}: not an image, audio or video file; attach PNG/JPEG, WAV/MP3 or MP4")
    return kind


def user_turn(message: dict) -> dict:
    """A MultimodalTextbox message ({"text", "files"}) as one user turn, media before text."""
    content = [{"type": media_kind(path), media_kind(path): path} for path in message.get("files") or []]
    if (message.get("text") or "").strip():
        content.append({"type": "text", "text": message["text"]})
    return {"role": "user", "content": content}


def speech_frames(seconds: float) -> int:
    return max(1, math.ceil(seconds * FRAMES_PER_SECOND))


class Answering:
    """Which browser tabs have an answer coming, and its job (once queued), so that Stop can cancel it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, Job | None] = {}

    def begin(self, session: str) -> bool:
        """Mark `session` as answering; False if it already is."""
        with self.lock:
            if session in self.jobs:
                return False
            self.jobs[session] = None
            return True

    def running(self, session: str, job: Job) -> None:
        with self.lock:
            self.jobs[session] = job

    def end(self, session: str) -> None:
        with self.lock:
            job = self.jobs.pop(session, None)
        if job is not None:
            job.cancel()  # no effect on a job that has ended; stops one whose tab went away

    def stop(self, session: str) -> None:
        with self.lock:
            job = self.jobs.get(session)
        if job is not None:
            job.cancel()


def build_ui(engine: Engine, checkpoint: Checkpoint, defaults: GenerationSettings, title: str, outputs: Path):
    """The chat, writing its spoken answers (and the media its turns fetch) under `outputs`."""
    outputs.mkdir(exist_ok=True)
    answering = Answering()

    def accept(message, chat, request: gr.Request):
        """The question into the chat and out of the box, unless this tab's previous answer is still coming:
        then it stays in the box, a notice says why, and nothing is asked (`asked` None)."""
        if not answering.begin(request.session_hash):
            gr.Warning(STILL_ANSWERING, title="Wait, or press Stop")
            return gr.skip(), gr.skip(), None
        chat = list(chat or [])
        for path in message.get("files") or []:
            chat.append({"role": "user", "content": {"path": path}})
        if (message.get("text") or "").strip():
            chat.append({"role": "user", "content": message["text"]})
        return None, chat, message

    async def respond(
        message, chat, conversation, speak, speaker, max_tokens, speech_seconds, temperature, top_p, request: gr.Request
    ):
        if message is None:  # refused by `accept`: this tab's previous answer is still coming
            return
        session = request.session_hash
        try:
            async for update in answer(
                message,
                list(chat or []),
                list(conversation or []),
                speak,
                speaker,
                max_tokens,
                speech_seconds,
                temperature,
                top_p,
                session,
            ):
                yield update
        finally:  # the answer ended, or the tab went away (Gradio closes this generator): stop generating for it
            answering.end(session)

    async def answer(
        message, chat, conversation, speak, speaker, max_tokens, speech_seconds, temperature, top_p, session
    ):
        try:
            turn = user_turn(message)
            settings = defaults.replace(
                max_new_tokens=int(max_tokens),
                do_sample=temperature > 0,
                temperature=float(temperature) or defaults.temperature,
                top_p=float(top_p),
                return_audio=bool(speak) and checkpoint.has_talker,
                speaker=speaker or defaults.speaker,
                talker_max_new_tokens=speech_frames(float(speech_seconds)),
            )
            job = await anyio.to_thread.run_sync(  # media may be fetched: not in the event loop
                engine.check_and_submit, [*conversation, turn], settings, outputs / "fetched", UI_NAMES
            )
            answering.running(session, job)
        except (RequestError, QueueFull, NotReady) as error:
            chat.append({"role": "assistant", "content": f"⚠️ {error}"})
            yield chat, conversation
            return
        chat.append({"role": "assistant", "content": ""})
        while True:
            try:
                kind, value = await next_event(job, timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                yield gr.skip(), gr.skip()  # nothing new; lets Gradio notice a closed tab
                continue
            if kind == "text":
                chat[-1] = {"role": "assistant", "content": chat[-1]["content"] + value}
                yield chat, conversation
            elif kind in ("error", "cancelled"):
                note = f"⚠️ {value}" if kind == "error" else "⏹ stopped"
                chat[-1] = {"role": "assistant", "content": (chat[-1]["content"] + "\n\n" + note).strip()}
                yield chat, conversation
                return
            elif kind == "done":
                chat[-1] = {"role": "assistant", "content": value.text}
                conversation = [
                    *conversation,
                    turn,
                    {"role": "assistant", "content": [{"type": "text", "text": value.text}]},
                ]
                if value.waveform is not None:
                    wav = outputs / f"answer_{uuid.uuid4().hex[:8]}.wav"
                    write_wav(wav, value.waveform)
                    chat.append({"role": "assistant", "content": {"path": str(wav), "mime_type": "audio/wav"}})
                yield chat, conversation
                return

    def stop(request: gr.Request):
        answering.stop(request.session_hash)

    with gr.Blocks(title=title) as ui:
        gr.Markdown(
            f"## {title}\nAsk anything, and attach images, audio or video (or record with the microphone). "
            "Each turn sends the whole conversation so far."
        )
        conversation = gr.State([])
        asked = gr.State(None)
        chat = gr.Chatbot(label="Qwen3-Omni", height=460, elem_id="chat")
        box = gr.MultimodalTextbox(
            file_types=["image", "audio", "video"],
            file_count="multiple",
            sources=["upload", "microphone"],
            placeholder="Ask a question; attach images, audio or video",
            show_label=False,
            elem_id="question",
        )
        with gr.Row():
            speak = gr.Checkbox(label="speak the answer", value=False, visible=checkpoint.has_talker, elem_id="speak")
            speaker = gr.Dropdown(
                checkpoint.speakers,
                value=defaults.speaker.lower() if checkpoint.has_talker else None,
                label="voice",
                visible=checkpoint.has_talker,
            )
            most_seconds = defaults.talker_max_new_tokens / FRAMES_PER_SECOND
            speech_seconds = gr.Slider(
                1,
                most_seconds,
                value=most_seconds,
                step=1,
                label="speech limit (seconds)",
                visible=checkpoint.has_talker,
                elem_id="speech_seconds",
            )
            max_tokens = gr.Slider(
                1,
                defaults.max_new_tokens,
                value=defaults.max_new_tokens,
                step=1,
                label="max new tokens",
                elem_id="max_tokens",
            )
            temperature = gr.Slider(
                0.0,
                2.0,
                value=defaults.temperature if defaults.do_sample else 0.0,
                step=0.05,
                label="temperature (0: greedy)",
            )
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top p")
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="stop")
            clear = gr.Button("Clear", elem_id="clear")
        settings = [speak, speaker, max_tokens, speech_seconds, temperature, top_p]
        answer_event = box.submit(
            accept, [box, chat], [box, chat, asked], concurrency_limit=None, trigger_mode="multiple"
        ).then(
            respond,
            [asked, chat, conversation, *settings],
            [chat, conversation],
            concurrency_limit=None,
        )
        stop_button.click(stop, None, None, queue=False)
        clear.click(lambda: ([], [], None), None, [chat, conversation, box], cancels=[answer_event])
    return ui, outputs
