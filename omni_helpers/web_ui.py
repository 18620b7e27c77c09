"""The resident server's browser UI (Gradio), in the manner of Qwen's own web demo: a chat with
history, text, uploaded images, audio and video, microphone recordings, the checkpoint's
voices, a "speak the answer" switch (only for checkpoints with a talker), sampling settings.

Each turn sends the whole conversation so far to the engine, earlier media and answers
included. A file that cannot be used (corrupt, unsupported, too short a clip) is answered
with a message in the chat; the server goes on.
"""

from __future__ import annotations

import mimetypes
import tempfile
import uuid
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import RequestError
from .outputs import write_wav
from .serving import Engine, QueueFull
from .settings import GenerationSettings

KINDS_BY_MIME = {"image": "image", "audio": "audio", "video": "video"}
UI_NAMES = {"max_new_tokens": "max new tokens", "talker_max_new_tokens": "--talker_max_new_tokens",
            "temperature": "temperature", "top_p": "top p", "top_k": "--top_k", "speaker": "voice",
            "return_audio": '"speak the answer"', "batch_size": "batch size"}  # fmt: skip


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


def build_ui(engine: Engine, checkpoint: Checkpoint, defaults: GenerationSettings, title: str):
    import gradio as gr

    outputs = Path(tempfile.mkdtemp(prefix="omni_speech_"))

    def respond(message, chat, conversation, speak, speaker, max_tokens, temperature, top_p):
        chat, conversation = list(chat or []), list(conversation or [])
        for path in message.get("files") or []:
            chat.append({"role": "user", "content": {"path": path}})
        if (message.get("text") or "").strip():
            chat.append({"role": "user", "content": message["text"]})
        try:
            turn = user_turn(message)
            settings = defaults.replace(
                max_new_tokens=int(max_tokens), do_sample=temperature > 0, temperature=float(temperature) or defaults.temperature,
                top_p=float(top_p), return_audio=bool(speak) and checkpoint.has_talker, speaker=speaker or defaults.speaker,
            )  # fmt: skip
            job = engine.check_and_submit([*conversation, turn], settings, outputs / "fetched", UI_NAMES)
        except (RequestError, QueueFull) as error:
            chat.append({"role": "assistant", "content": f"⚠️ {error}"})
            yield chat, conversation, None
            return
        chat.append({"role": "assistant", "content": ""})
        while True:
            kind, value = job.events.get()
            if kind == "text":
                chat[-1] = {"role": "assistant", "content": chat[-1]["content"] + value}
                yield chat, conversation, None
            elif kind == "error":
                chat[-1] = {"role": "assistant", "content": f"⚠️ {value}"}
                yield chat, conversation, None
                return
            elif kind == "done":
                chat[-1] = {"role": "assistant", "content": value.text}
                conversation = [*conversation, turn, {"role": "assistant", "content": [{"type": "text", "text": value.text}]}]
                if value.waveform is not None:
                    wav = outputs / f"answer_{uuid.uuid4().hex[:8]}.wav"
                    write_wav(wav, value.waveform)
                    chat.append({"role": "assistant", "content": {"path": str(wav), "mime_type": "audio/wav"}})
                yield chat, conversation, None
                return

    with gr.Blocks(title=title) as ui:
        gr.Markdown(f"## {title}\nAsk anything, and attach images, audio or video (or record with the microphone). "
                    "Each turn sends the whole conversation so far.")  # fmt: skip
        conversation = gr.State([])
        chat = gr.Chatbot(label="Qwen3-Omni", height=460, elem_id="chat")
        box = gr.MultimodalTextbox(
            file_types=["image", "audio", "video"], file_count="multiple", sources=["upload", "microphone"],
            placeholder="Ask a question; attach images, audio or video", show_label=False, elem_id="question",
        )  # fmt: skip
        with gr.Row():
            speak = gr.Checkbox(label="speak the answer", value=False, visible=checkpoint.has_talker, elem_id="speak")
            speaker = gr.Dropdown(checkpoint.speakers, value=defaults.speaker.lower() if checkpoint.has_talker else None,
                                  label="voice", visible=checkpoint.has_talker)  # fmt: skip
            max_tokens = gr.Slider(1, 8192, value=defaults.max_new_tokens, step=1, label="max new tokens", elem_id="max_tokens")
            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature if defaults.do_sample else 0.0, step=0.05,
                                    label="temperature (0: greedy)")  # fmt: skip
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top p")
        clear = gr.Button("Clear", elem_id="clear")
        box.submit(respond, [box, chat, conversation, speak, speaker, max_tokens, temperature, top_p], [chat, conversation, box])
        clear.click(lambda: ([], [], None), None, [chat, conversation, box])
    return ui, outputs
