r"""Load Qwen3-Omni once, then talk to it for hours: a browser UI and an OpenAI-compatible API.

On Ascend, two NPUs (the launcher wraps msrun; rank 0 serves, every rank generates):

    bash scripts/run_web_demo.sh --port 7860          # then open http://127.0.0.1:7860

One process (CPU, the tiny test checkpoint):

    python web_demo.py --device_target CPU --model_name tiny_ckpt

Routes on --host:--port: `/` the browser UI; `GET /health`; `GET /v1/models`;
`POST /v1/chat/completions` (OpenAI Chat Completions: text, image_url, input_audio and
video_url parts; "modalities": ["text", "audio"] for speech; "stream": true for
server-sent chunks of text and speech as they are generated):

    curl http://127.0.0.1:7860/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'

The generation flags are the server's defaults; a request's own fields override them, and
--max_new_tokens and --talker_max_new_tokens are also the most a request may ask for (a
request's `talker_max_new_tokens` field, or the UI's speech limit, caps its speech). The
requests waiting when a generation starts run together, as the rows of one batch (up to
--max_batch_size, padded to 1, 2, 4 or 8 rows by repeating a row; rows with and without speech
share a batch; those with other settings, a seed, other speech settings than the batch's
speaking rows, or images beside videos wait for the next; a batch waits up to --batch_window_ms
for the requests it expects: the clients the last generation answered, those waiting then, and
those still on their way in), each client streamed its own row; a batch's speaking rows wait up
to --speech_window_ms, once their text is done, for the batches that follow, so that the rows of
several batches speak as one talker batch; past --max_queue waiting ones a new request gets
HTTP 429; a request past --max_audio_seconds, --max_video_seconds, --max_media_items or
--max_turns gets HTTP 400 naming the flag. A client that disconnects (or presses Stop in the UI) cancels its request at the
next decoding step. Local files are read only under --allowed_local_media_path. The server
answers /health from the start ("ready": false while the model loads).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from omni_helpers.request.checkpoint import Checkpoint, resolve_checkpoint
from omni_helpers.request.cli import (
    add_audio_in_video_arg,
    add_generation_args,
    add_model_args,
    add_pixel_args,
    add_speech_args,
    argument_parser,
    check_common_flags,
    exit_for,
    generation_settings,
    resolve_precision,
)
from omni_helpers.request.errors import RequestError
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.request.validation import RequestLimits, check_device, check_settings
from omni_helpers.runtime import configure_openmp, progress, stdout_for_the_launcher

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
SPEECH_FRAMES = 750  # the server's speech limit: 60 s (12.5 codec frames per second); the scripts' is 4096
LIMITS = RequestLimits()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    add_model_args(parser, DEFAULT_MODEL)
    add_pixel_args(parser)
    add_generation_args(parser)
    add_speech_args(parser, return_audio=False)
    add_audio_in_video_arg(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=7860, help="port of the UI and the API")
    server.add_argument("--max_queue", type=int, default=8, help="requests that may wait; more get HTTP 429")
    server.add_argument(
        "--max_batch_size", type=int, default=8, help="requests answered together in one generation, at most"
    )
    server.add_argument(
        "--batch_window_ms",
        type=float,
        default=200,
        help="how long a batch may wait, after the last generation's end, for the clients it answered (they ask "
        "again as their answers end) and those waiting then, and after its first request for those still on their "
        "way in; 0: never wait",
    )
    server.add_argument(
        "--speech_window_ms",
        type=float,
        default=400,
        help="how long a batch's speaking rows may wait, once their text is done, for the batches that follow (the "
        "clients answered in text ask again) so that the rows of several batches speak as one talker batch, up to "
        "--max_batch_size; 0: every batch speaks at once",
    )
    server.add_argument(
        "--graphs_kept",
        type=int,
        default=8,
        help="compiled graphs kept per kind, each batch size and length its own (a decode graph holds its KV "
        "buffers: at full size 96 KiB per row and position for the thinker); the scripts keep 2",
    )
    server.add_argument(
        "--allowed_local_media_path",
        default=None,
        metavar="DIR",
        help="requests may name local files under DIR (none by default: data: and http(s) URLs only)",
    )
    limits = parser.add_argument_group("what one request may hold (each beyond it: HTTP 400 naming the flag)")
    limits.add_argument(
        "--max_audio_seconds", type=float, default=LIMITS.audio_seconds, help="audio, videos' sound too"
    )
    limits.add_argument("--max_video_seconds", type=float, default=LIMITS.video_seconds, help="video")
    limits.add_argument("--max_media_items", type=int, default=LIMITS.media_items, help="images, audio and videos")
    limits.add_argument("--max_turns", type=int, default=LIMITS.turns, help="messages, the history included")
    parser.set_defaults(talker_max_new_tokens=SPEECH_FRAMES)
    return parser.parse_args(argv)


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(args.max_audio_seconds, args.max_video_seconds, args.max_media_items, args.max_turns)


def check(args: argparse.Namespace) -> tuple[Checkpoint, GenerationSettings]:
    """The flags, checked with small reads only: the server's checkpoint and default settings."""
    check_common_flags(args)
    check_device(args.device_target)
    if args.max_queue < 0:
        raise RequestError(f"--max_queue {args.max_queue}: must be 0 or more")
    if args.max_batch_size < 1:
        raise RequestError(f"--max_batch_size {args.max_batch_size}: must be 1 or more")
    if args.graphs_kept < 1:
        raise RequestError(f"--graphs_kept {args.graphs_kept}: must be 1 or more")
    if args.batch_window_ms < 0:
        raise RequestError(f"--batch_window_ms {args.batch_window_ms:g}: must be 0 or more")
    if args.speech_window_ms < 0:
        raise RequestError(f"--speech_window_ms {args.speech_window_ms:g}: must be 0 or more")
    request_limits(args).check()
    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).is_dir():
        raise RequestError(f"--allowed_local_media_path {args.allowed_local_media_path}: no such folder")
    checkpoint = resolve_checkpoint(args.model_name, args.allow_pickle_weights)
    defaults = generation_settings(args)
    check_settings(defaults.replace(return_audio=checkpoint.has_talker), checkpoint)  # its speaker too, where it speaks
    with socket.socket() as probe:  # a busy port fails now, not after the load
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
        except OSError as error:
            raise RequestError(
                f"--host {args.host} --port {args.port}: cannot listen there ({error.strerror}); pick another --port"
            ) from error
    return checkpoint, defaults


def serve_in_background(app, host: str, port: int):
    """uvicorn in a thread of its own: MindSpore keeps the main thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    return server, thread


def main(args: argparse.Namespace) -> None:
    stdout_for_the_launcher()  # under scripts/run_web_demo.sh, rank 0's stdout is what the console shows
    # 1. The flags, checked before anything heavy (a bad one exits with code 2 on every rank)
    try:
        checkpoint, defaults = check(args)
    except RequestError as error:
        exit_for(error)

    configure_openmp(args.device_target)
    # MindSpore, mindone and torch are imported only now, so that --help and bad flags answer at once.
    progress("importing MindSpore, mindone and torch")
    from omni_helpers.loading import load_model, load_processor, shard_model
    from omni_helpers.mindone_changes.faster.compiled import keep_graphs
    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.runtime import log, setup_runtime
    from omni_helpers.serving.engine import Engine, follow
    from omni_helpers.serving.lockstep import Lockstep

    # 2. Device, msrun ranks, seeds
    runtime = setup_runtime(args.device_target, args.seed, args.parallel, args.verbose)

    # 3. Change how mindone runs: CPU kernels (CPU only), fixes for mindone's bugs,
    #    faster paths (unless --no-fast_paths)
    install_patches(args.device_target, args.fast_paths)
    keep_graphs(args.graphs_kept)  # a server's batches come in more shapes than a script's

    # 4. Rank 0 serves the UI and the API from a thread at once (/health says "ready": false while the model loads)
    lockstep = Lockstep(runtime)
    engine = Engine(
        checkpoint,
        lockstep,
        defaults,
        args.max_queue,
        request_limits(args),
        args.max_batch_size,
        args.batch_window_ms / 1000,
        args.speech_window_ms / 1000,
    )
    if runtime.is_main_process:
        scratch = scratch_folder()
        server, thread = serve_in_background(
            build_app(args, checkpoint, defaults, engine, runtime, Path(scratch.name)), args.host, args.port
        )
        print(
            f"serving {args.model_name} at http://{args.host}:{args.port} (UI at /, API at /v1/chat/completions); "
            "loading the model",
            flush=True,
        )

    # 5. Load the processor and the model once (with its talker, if it has one); spread it over the ranks
    dtype, attn_implementation = resolve_precision(args.device_target, args.dtype, args.attn_implementation)
    processor = load_processor(checkpoint.path, args.min_pixels, args.max_pixels)
    model = load_model(checkpoint.path, dtype, attn_implementation, checkpoint.has_talker, args.allow_pickle_weights)
    model = shard_model(model, runtime, stack=args.fast_paths)

    # 6. Every rank but 0 runs the generations rank 0 sends, until it says stop
    if not runtime.is_main_process:
        follow(model, processor, lockstep)
        return

    # 7. Rank 0 answers the requests here: those waiting when a generation starts, together
    engine.attach(model, processor)
    stop_on_signals(engine, Path(scratch.name))
    print(f"ready: {args.model_name} at http://{args.host}:{args.port}", flush=True)
    log(runtime, f"ready: --parallel {runtime.parallel} over {runtime.world_size} rank(s)")
    try:
        engine.serve_forever()  # until SIGINT or SIGTERM
    finally:  # a fault under msrun too: MindSpore's exit then skips Python's clean-up
        server.should_exit = True
        thread.join(timeout=10)
        scratch.cleanup()


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A folder of this run's own for what requests bring and what the browser is answered with (fetched
    media, uploads, spoken answers), removed when the server stops: no user's media outlive the server.
    Gradio keeps its uploads there too unless GRADIO_TEMP_DIR is set (it reads it when first imported)."""
    scratch = tempfile.TemporaryDirectory(prefix="omni_server_")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(scratch.name) / "uploads"))
    return scratch


def build_app(
    args: argparse.Namespace, checkpoint: Checkpoint, defaults: GenerationSettings, engine, runtime, scratch: Path
):
    """The API's routes and the browser UI in one ASGI app; requests wait for `engine` to have the model. What
    requests bring and what the browser is answered with goes under `scratch`."""
    import gradio as gr

    from omni_helpers.serving.http_api import ApiErrors, ChatCompletions, build_api
    from omni_helpers.serving.web_ui import build_ui

    allowed = Path(args.allowed_local_media_path).resolve() if args.allowed_local_media_path else None
    media_root = scratch / "requests"
    media_root.mkdir()
    chat = ChatCompletions(
        engine, checkpoint, args.model_name, defaults, media_root, allowed, checkpoint.config["im_end_token_id"]
    )
    health = {
        "model": args.model_name,
        "checkpoint_kind": checkpoint.kind,
        "speech": checkpoint.has_talker,
        "speakers": checkpoint.speakers if checkpoint.has_talker else [],
        "parallel": runtime.parallel,
        "world_size": runtime.world_size,
        "attn_implementation": resolve_precision(args.device_target, args.dtype, args.attn_implementation)[1],
    }
    ui, speech_folder = build_ui(
        engine, checkpoint, defaults, f"Qwen3-Omni ({checkpoint.kind}) on MindSpore", scratch / "speech"
    )
    return ApiErrors(gr.mount_gradio_app(build_api(chat, health), ui, path="/", allowed_paths=[str(speech_folder)]))


def stop_on_signals(engine, scratch: Path) -> None:
    """SIGINT or SIGTERM: an idle server tells every rank to stop and exits 0; a busy one removes `scratch`
    and exits at once with 128 + the signal, and msrun then stops the other ranks."""

    def stop(signum, frame):
        if engine.busy:
            print(f"stopping in the middle of a request (signal {signum})", file=sys.stderr, flush=True)
            shutil.rmtree(scratch, ignore_errors=True)  # os._exit skips the clean-up at exit
            os._exit(128 + signum)
        engine.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    main(parse_args())
