"""The transformers (PyTorch) reference served the way Qwen's own web demo serves it, for
`bench_serve.py`'s side-by-side: one request at a time, `generate` run to its end, then the
whole answer (text, then speech) sent to the client. The same route and request fields as
web_demo.py's /v1/chat/completions for what the benchmark sends (text, image_url and
input_audio parts as data URLs, modalities, audio.voice, max_tokens,
talker_max_new_tokens), streamed as server-sent events.

    server = start_reference_server("tiny_ckpt")   # http://127.0.0.1:<port>, in a thread
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class ReferenceServer:
    url: str
    http: ThreadingHTTPServer

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def load_reference(checkpoint: str):
    """The transformers model (float32, eager attention, as the project's parity tests run it) and the processor
    web_demo.py runs, with its default image limits: both servers get the same inputs (numpy arrays, which
    transformers' fast image processor would refuse), so they differ in the model alone."""
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_helpers.loading import load_processor
    from omni_helpers.request.cli import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model, load_processor(Path(checkpoint), DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


def answer(model, processor, body: dict, folder: Path) -> tuple[str, object, int, int]:
    """Qwen's demo's steps for one request: template, media, processor, `generate`, decode. (text, waveform or
    None, prompt tokens, new tokens)."""
    import torch

    from omni_helpers.generation.core import prepare_inputs
    from omni_helpers.request.settings import GenerationSettings
    from omni_helpers.serving.openai_api import parse_chat_request

    chat = parse_chat_request(body, GenerationSettings(), folder, None)
    inputs = prepare_inputs(processor, [chat.conversation], chat.settings)
    torch_inputs = {
        k: (torch.from_numpy(v).float() if v.dtype.kind == "f" else torch.from_numpy(v).long())
        for k, v in inputs.items()
    }
    settings = chat.settings
    with torch.no_grad():
        result = model.generate(
            **torch_inputs,
            return_audio=settings.return_audio,
            speaker=settings.speaker,
            thinker_max_new_tokens=settings.max_new_tokens,
            thinker_eos_token_id=model.config.im_end_token_id,
            thinker_return_dict_in_generate=True,
            thinker_do_sample=False,
            talker_do_sample=False,
            talker_max_new_tokens=settings.talker_max_new_tokens,
            use_audio_in_video=settings.use_audio_in_video,
        )
    thinker, waveform = result if isinstance(result, tuple) else (result, None)
    prompt = inputs["input_ids"].shape[1]
    new = thinker.sequences[0, prompt:]
    text = processor.batch_decode(new[None], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    samples = None if waveform is None else waveform.reshape(-1).float().numpy()
    return text, samples, prompt, int(new.shape[0])


def handler_for(model, processor):
    one_at_a_time = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            from omni_helpers.serving.http_api import pcm16
            from omni_helpers.serving.openai_api import chunk

            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            folder = Path(tempfile.mkdtemp(prefix="reference_request_"))
            try:
                with one_at_a_time:
                    text, samples, prompt, new = answer(model, processor, body, folder)
            except Exception as error:  # the client is told, and the server goes on
                self.send_error(500, explain=f"{type(error).__name__}: {error}")
                return
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            request_id, events = uuid.uuid4().hex, [{"content": text}]
            if samples is not None:
                events.append({"audio": {"id": request_id, "data": base64.b64encode(pcm16(samples)).decode()}})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for delta in events:
                self.wfile.write(f"data: {json.dumps(chunk(request_id, 'reference', delta))}\n\n".encode())
            usage = {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}
            metrics = {"audio_seconds": 0.0 if samples is None else len(samples) / 24000}
            final = chunk(request_id, "reference", {}, "stop", usage=usage, metrics=metrics)
            self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())

    return Handler


def start_reference_server(checkpoint: str, host: str = "127.0.0.1") -> ReferenceServer:
    model, processor = load_reference(checkpoint)
    http = ThreadingHTTPServer((host, 0), handler_for(model, processor))
    threading.Thread(target=http.serve_forever, name="reference", daemon=True).start()
    time.sleep(0.1)
    return ReferenceServer(f"http://{host}:{http.server_address[1]}", http)
