r"""Ask Qwen3-Omni about any mix of images, audio, video and text; get text, and speech if asked.

On Ascend, two NPUs, the model sharded with ZeRO-3 (add `--parallel expert` to give each NPU
half of the experts instead, with far less traffic per token; see the README):

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log \
        --join=True --cluster_time_out=300 omni_understanding.py \
        --model_name Qwen3-Omni-30B-A3B-Instruct \
        --image cars.jpg --audio cough.wav \
        --prompt "What can you see and hear? Answer in one short sentence." \
        --return_audio

Many requests through one loaded model, 4 at a time (one JSON object per line,
{"id": ..., "conversation": [...]}); answers go to OUTPUT_DIR/results.jsonl:

    python omni_understanding.py --model_name Qwen3-Omni-30B-A3B-Instruct \
        --requests questions.jsonl --batch_size 4 [--resume]

One process (CPU, the tiny test checkpoint):

    python omni_understanding.py --device_target CPU --model_name tiny_ckpt \
        --image sample_media/image.png --prompt "What is this?" --max_new_tokens 16 --stream

Rank 0 prints the answer and writes OUTPUT_DIR/result.json (and output.wav with
--return_audio). Instruct and Thinking checkpoints (Thinking has no talker: text only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from omni_helpers.request.cli import (
    add_audio_in_video_arg,
    add_generation_args,
    add_media_args,
    add_model_args,
    add_output_args,
    add_pixel_args,
    add_request_args,
    add_speech_args,
    argument_parser,
    check_request,
    exit_for,
    resolve_precision,
)
from omni_helpers.request.conversation import media_in, resolve_paths, user_turn, with_system_prompt
from omni_helpers.request.errors import RequestError
from omni_helpers.request.request_files import Request, load_conversation_file, load_requests_file
from omni_helpers.runtime import configure_openmp, stdout_for_the_launcher

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    add_model_args(parser, DEFAULT_MODEL)
    add_request_args(parser)
    parser.add_argument(
        "--requests",
        default=None,
        metavar="FILE.jsonl",
        help='many requests, one JSON object per line: {"id": ..., "conversation": [...]}',
    )
    add_media_args(parser)
    add_pixel_args(parser)
    add_generation_args(parser)
    add_speech_args(parser)
    add_audio_in_video_arg(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def build_requests(args: argparse.Namespace) -> list[Request]:
    """The requests: a --requests file, a --conversation file, or one built from the flags."""
    flags = [
        name
        for name, value in (
            ("--prompt", args.prompt),
            ("--system_prompt", args.system_prompt),
            ("--image", args.image),
            ("--audio", args.audio),
            ("--video", args.video),
        )
        if value
    ]
    if args.requests and args.conversation:
        raise RequestError("--requests and --conversation: give one or the other")
    if (args.requests or args.conversation) and flags:
        source = "--requests" if args.requests else "--conversation"
        raise RequestError(f"{source} replaces {', '.join(flags)}: give the file or the flags, not both")
    if args.requests:
        return load_requests_file(args.requests)
    if args.conversation:
        return [Request("1", load_conversation_file(args.conversation))]
    turn = user_turn(args.prompt, images=args.image, audios=args.audio, videos=args.video)
    return [Request("1", resolve_paths(with_system_prompt([turn], args.system_prompt), Path.cwd()))]


def main(args: argparse.Namespace):
    stdout_for_the_launcher()  # under scripts/run_*.sh, rank 0's stdout is what the console shows
    # 1. The request, checked before anything heavy (a bad one exits with code 2 on every rank).
    #    URLs are fetched into a folder that lives as long as the run.
    media_folder = tempfile.TemporaryDirectory(prefix="omni_media_")
    try:
        given = build_requests(args)
        checkpoint, requests, settings = check_request(args, given, Path(media_folder.name))
    except RequestError as error:
        exit_for(error)

    configure_openmp(args.device_target)
    # MindSpore, mindone and torch are imported only now, so that --help and bad requests answer at once.
    from omni_helpers.loading import load_model, load_processor, shard_model
    from omni_helpers.measuring.metrics import StageClock, run_metrics
    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.outputs.answering import Output, answer_in_batches, answer_one
    from omni_helpers.runtime import setup_runtime

    # 2. Device, msrun ranks, seeds
    runtime = setup_runtime(args.device_target, args.seed, args.parallel, args.verbose, scratch=media_folder)

    # 3. Change how mindone runs: CPU kernels (CPU only), fixes for mindone's bugs,
    #    faster paths (unless --no-fast_paths)
    install_patches(args.device_target, args.fast_paths)
    imported_at = time.time()  # MindSpore, mindone and torch imported and set up

    # 4. Load the processor and the model; spread the model over msrun's workers as --parallel says
    clock = StageClock()
    dtype, attn_implementation = resolve_precision(args.device_target, args.dtype, args.attn_implementation)
    with clock("load"):
        processor = load_processor(checkpoint.path, args.min_pixels, args.max_pixels)
        model = load_model(
            checkpoint.path, dtype, attn_implementation, settings.return_audio, args.allow_pickle_weights
        )
        model = shard_model(model, runtime, stack=args.fast_paths)
    loaded_at = time.time()

    # 5. Generate (template, media, processor, generate, decode: omni_helpers/generation/core.py) and
    # 6. print and save on rank 0: result.json for one request, results.jsonl for --requests
    output = Output(
        runtime,
        args.output_dir,
        args.stream,
        labelled=bool(args.requests),
        run_metrics=lambda: run_metrics(clock, runtime, model),
        started=(imported_at, loaded_at),
    )
    if args.requests:
        return answer_in_batches(model, processor, requests, settings, output, args.batch_size, args.resume)
    conversation = given[0].conversation  # as the user gave it, URLs and all
    inputs = {"conversation": conversation, "use_audio_in_video": settings.use_audio_in_video, **media_in(conversation)}
    try:
        return answer_one(model, processor, requests[0], settings, output, inputs, args.model_name)
    except RequestError as error:  # found once the prompt is built: too long for the context, media that do not decode
        exit_for(error)


if __name__ == "__main__":
    main(parse_args())
