r"""Caption audio with Qwen3-Omni-30B-A3B-Captioner: one detailed caption per audio file, no prompt needed.

On Ascend, two NPUs, the model sharded with ZeRO-3 (add `--parallel expert` to give each NPU
half of the experts instead, with far less traffic per token; see the README), 8 files at a time:

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log \
        --join=True --cluster_time_out=300 audio_captioning.py \
        --model_name Qwen3-Omni-30B-A3B-Captioner \
        --audio street.wav --audio kitchen.wav --batch_size 8

One process (CPU, the tiny test checkpoint):

    python audio_captioning.py --device_target CPU --model_name tiny_ckpt \
        --audio sample_media/audio.wav --max_new_tokens 16

Rank 0 prints one line per file, `<file>: <caption>`, and writes each caption to
OUTPUT_DIR/results.jsonl as its batch finishes (`--resume` skips files already there),
then OUTPUT_DIR/result.json with `text` a list, one caption per audio, in the order given.
The Captioner takes the audio alone; with an Instruct or Thinking checkpoint, --prompt
asks for what you want to know about each file. Captions are text only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from omni_helpers.request.cli import (
    add_generation_args,
    add_media_args,
    add_model_args,
    add_output_args,
    add_request_args,
    argument_parser,
    check_request,
    exit_for,
    resolve_precision,
)
from omni_helpers.request.conversation import resolve_paths, user_turn, with_system_prompt
from omni_helpers.request.errors import RequestError
from omni_helpers.request.request_files import Request
from omni_helpers.runtime import configure_openmp, stdout_for_the_launcher

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Captioner"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    add_model_args(parser, DEFAULT_MODEL)
    add_request_args(parser, conversation=False)
    add_media_args(parser, image=False, video=False)
    add_generation_args(parser)
    add_output_args(parser)
    return parser.parse_args(argv)


def build_requests(args: argparse.Namespace) -> list[Request]:
    """One conversation per audio file, filed under the file as given."""
    if not args.audio:
        raise RequestError("no audio: give one or more --audio files")
    repeated = sorted({a for a in args.audio if args.audio.count(a) > 1})
    if repeated:
        raise RequestError(f"--audio {repeated[0]} is given twice; give each file once")
    return [
        Request(
            audio,
            resolve_paths(with_system_prompt([user_turn(args.prompt, audios=[audio])], args.system_prompt), Path.cwd()),
        )
        for audio in args.audio
    ]


def main(args: argparse.Namespace) -> dict:
    stdout_for_the_launcher()  # under scripts/run_*.sh, rank 0's stdout is what the console shows
    # 1. The requests, one per audio, checked before anything heavy (bad ones exit with code 2 on every rank)
    media_folder = tempfile.TemporaryDirectory(prefix="omni_media_")
    try:
        checkpoint, requests, settings = check_request(
            args, build_requests(args), Path(media_folder.name), "an audio file"
        )
    except RequestError as error:
        exit_for(error)

    configure_openmp(args.device_target)
    # MindSpore, mindone and torch are imported only now, so that --help and bad requests answer at once.
    from omni_helpers.loading import load_model, load_processor, shard_model
    from omni_helpers.measuring.metrics import StageClock, combined, run_metrics, summary_line
    from omni_helpers.mindone_changes.patches import install_patches
    from omni_helpers.outputs.answering import Output, answer_in_batches
    from omni_helpers.outputs.files import RESULT_FILE, write_json
    from omni_helpers.runtime import log, setup_runtime

    # 2. Device, msrun ranks, seeds
    runtime = setup_runtime(args.device_target, args.seed, args.parallel, args.verbose, scratch=media_folder)

    # 3. Change how mindone runs: CPU kernels (CPU only), fixes for mindone's bugs,
    #    faster paths (unless --no-fast_paths)
    install_patches(args.device_target, args.fast_paths)
    imported_at = time.time()  # MindSpore, mindone and torch imported and set up

    # 4. Load the processor and the model (text only: no talker); spread it as --parallel says
    clock = StageClock()
    dtype, attn_implementation = resolve_precision(args.device_target, args.dtype, args.attn_implementation)
    with clock("load"):
        processor = load_processor(checkpoint.path)  # audio only: no image limits
        model = shard_model(
            load_model(checkpoint.path, dtype, attn_implementation, False, args.allow_pickle_weights),
            runtime,
            stack=args.fast_paths,
        )
    loaded_at = time.time()

    # 5. Caption, --batch_size files at a time (template, audio, processor, generate, decode:
    #    omni_helpers/generation/core.py); rank 0 prints and files each caption as its batch finishes
    output = Output(
        runtime,
        args.output_dir,
        args.stream,
        labelled=True,
        run_metrics=lambda: run_metrics(clock, runtime, model),
        started=(imported_at, loaded_at),
    )
    lines = answer_in_batches(model, processor, requests, settings, output, args.batch_size, args.resume)

    # 6. Every caption in one result.json (rank 0)
    answered = [line["metrics"] for line in lines if line.get("metrics")]
    result = {
        "model": args.model_name,
        "inputs": {"audio": list(args.audio), "prompt": args.prompt},
        "text": [line["text"] for line in lines],
        "audio": None,
        "metrics": combined(answered) if answered else None,
    }
    if runtime.is_main_process:
        if answered:
            log(runtime, summary_line(result["metrics"]))
        write_json(Path(args.output_dir) / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    main(parse_args())
