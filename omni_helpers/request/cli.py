"""Command-line flags shared by the scripts and the server, with the same names and meaning
everywhere, and the two things built from them: the generation settings and the exit
code of a bad request. Imports nothing heavy: `--help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from omni_helpers.request.checkpoint import Checkpoint, resolve_checkpoint
from omni_helpers.request.errors import RequestError
from omni_helpers.request.parallel_modes import PARALLEL_MODES
from omni_helpers.request.request_files import Request
from omni_helpers.request.settings import DEFAULT_SPEAKER, GenerationSettings
from omni_helpers.request.validation import check_device, check_requests, check_settings

# The seed's processor limits (about 4 and 768 merged 28x28 patches); lower max_pixels if memory is short.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 14 * 14 * 768
DEFAULTS = GenerationSettings()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's line breaks (the msrun examples) and show every default."""


# Flags spelled as the OpenAI API (or other tools) spell them, and this collection's name for each.
OTHER_SPELLINGS = {
    "--max_tokens": "--max_new_tokens",
    "--max_completion_tokens": "--max_new_tokens",
    "--voice": "--speaker",
    "--model": "--model_name",
    "--device": "--device_target",
    "--num_workers": "--batch_size",
    "--talker_max_tokens": "--talker_max_new_tokens",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose error for an unknown flag names the flag meant where it is spelled another way."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            given = message.split(":", 1)[1].split()
            hints = [
                f"{flag} is spelled {OTHER_SPELLINGS[flag.split('=')[0]]} here"
                for flag in given
                if flag.split("=")[0] in OTHER_SPELLINGS
            ]
            if hints:
                message += f" ({'; '.join(hints)})"
        super().error(message)


def argument_parser(description: str) -> ArgumentParser:
    """The parser every script and the server start from: the module docstring as the help's description."""
    return ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    """Which checkpoint, on which device, spread over msrun's workers how."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_name",
        default=default_model,
        help="local checkpoint directory, or a hub id already downloaded to the local cache",
    )
    group.add_argument(
        "--device_target",
        choices=["Ascend", "CPU"],
        default="Ascend",
        help="CPU installs CPU kernels for Ascend-only ops (flash attention's included) and uses float32",
    )
    group.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="weights dtype (None: bfloat16 on Ascend, float32 on CPU)",
    )
    group.add_argument(
        "--attn_implementation",
        choices=["flash_attention_2", "eager"],
        default=None,
        help="attention kernel (None: flash_attention_2, what Ascend runs, on CPU too)",
    )
    group.add_argument(
        "--parallel",
        choices=PARALLEL_MODES,
        default=None,
        help="how msrun's workers share the model: ZeRO-3 weight sharding, a share of the experts "
        "each, or a whole copy each (None: zero3 with several workers, none otherwise)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed, the same on every rank")
    group.add_argument(
        "--allow_pickle_weights",
        action="store_true",
        help="also load .bin/.pt/.ckpt weights (unpickling runs code from the file; safetensors only by default)",
    )
    group.add_argument(
        "--fast_paths",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="this project's faster paths (compiled steps, MoE on the device, host positions); "
        "--no-fast_paths runs mindone with this project's bug fixes alone",
    )
    group.add_argument("--verbose", action="store_true", help="log each decoding step's time on stderr")


def add_pixel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image and video frames")
    group.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS, help="image processor minimum pixels")
    group.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="image processor maximum pixels")


def add_request_args(parser: argparse.ArgumentParser, conversation: bool = True) -> None:
    group = parser.add_argument_group("request")
    group.add_argument("--prompt", default=None, help="the question or instruction")
    group.add_argument("--system_prompt", default=None, help="a system message placed before the request")
    if conversation:
        group.add_argument(
            "--conversation",
            default=None,
            metavar="FILE",
            help="a JSON conversation in the official message format, instead of --prompt and the media flags",
        )


def add_media_args(parser: argparse.ArgumentParser, image: bool = True, audio: bool = True, video: bool = True) -> None:
    """Repeatable media flags: local path, file://, http(s):// or data: URL."""
    group = parser.add_argument_group("media (repeatable; local path, file://, http(s):// or data: URL)")
    if image:
        group.add_argument("--image", action="append", default=[], help="an image")
    if audio:
        group.add_argument("--audio", action="append", default=[], help="an audio file")
    if video:
        group.add_argument("--video", action="append", default=[], help="a video file")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text generation (the thinker)")
    group.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens, help="tokens to generate at most")
    group.add_argument("--do_sample", action="store_true", help="sample (greedy by default)")
    group.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="sampling temperature")
    group.add_argument("--top_p", type=float, default=DEFAULTS.top_p, help="nucleus sampling")
    group.add_argument("--top_k", type=int, default=DEFAULTS.top_k, help="top-k sampling")


def add_speech_args(parser: argparse.ArgumentParser, return_audio: bool = True) -> None:
    """Spoken output (Instruct checkpoints, which have a talker); the server lets each request ask for it."""
    group = parser.add_argument_group("speech output (the talker)")
    if return_audio:
        group.add_argument("--return_audio", action="store_true", help="also speak the answer (24 kHz mono WAV)")
    group.add_argument("--speaker", default=DEFAULT_SPEAKER, help="voice of the spoken answer (Ethan, Chelsie, Aiden)")
    group.add_argument(
        "--talker_max_new_tokens",
        type=int,
        default=DEFAULTS.talker_max_new_tokens,
        help="codec frames to generate at most (one frame is 80 ms of speech)",
    )
    group.add_argument(
        "--talker_do_sample",
        action="store_true",
        help="sample the speech as the released model does: the talker with the settings below, its code "
        "predictor with top-k 50, top-p 0.8 (greedy by default)",
    )
    group.add_argument(
        "--talker_temperature", type=float, default=DEFAULTS.talker_temperature, help="talker sampling temperature"
    )
    group.add_argument("--talker_top_k", type=int, default=DEFAULTS.talker_top_k, help="talker top-k sampling")
    group.add_argument("--talker_top_p", type=float, default=DEFAULTS.talker_top_p, help="talker nucleus sampling")
    group.add_argument(
        "--talker_repetition_penalty",
        type=float,
        default=DEFAULTS.talker_repetition_penalty,
        help="penalty on the codes spoken so far (1.0: none), greedy or not",
    )


def add_audio_in_video_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--use_audio_in_video",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also listen to each video's audio track (--no-use_audio_in_video to ignore it)",
    )


def add_output_args(parser: argparse.ArgumentParser, batch: bool = True) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", default="outputs", help="where rank 0 writes the results")
    group.add_argument("--stream", action="store_true", help="print the answer as it is generated (rank 0)")
    if batch:
        group.add_argument(
            "--batch_size",
            type=int,
            default=1,
            help="conversations generated together, left-padded (each row speaks its own answer)",
        )
        group.add_argument(
            "--resume", action="store_true", help="skip the requests whose ids are already in OUTPUT_DIR/results.jsonl"
        )


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The flags as settings (a script without speech flags speaks no answer)."""
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        return_audio=getattr(args, "return_audio", False),
        speaker=getattr(args, "speaker", DEFAULT_SPEAKER),
        talker_max_new_tokens=getattr(args, "talker_max_new_tokens", DEFAULTS.talker_max_new_tokens),
        talker_do_sample=getattr(args, "talker_do_sample", False),
        talker_temperature=getattr(args, "talker_temperature", DEFAULTS.talker_temperature),
        talker_top_k=getattr(args, "talker_top_k", DEFAULTS.talker_top_k),
        talker_top_p=getattr(args, "talker_top_p", DEFAULTS.talker_top_p),
        talker_repetition_penalty=getattr(args, "talker_repetition_penalty", DEFAULTS.talker_repetition_penalty),
        use_audio_in_video=getattr(args, "use_audio_in_video", False),
    )


def check_common_flags(args: argparse.Namespace) -> None:
    """Flag values that are wrong whatever the checkpoint."""
    if getattr(args, "min_pixels", 0) > getattr(args, "max_pixels", 1):
        raise RequestError(
            f"--min_pixels {args.min_pixels} is greater than --max_pixels {args.max_pixels}; swap or lower it"
        )
    batch_size = getattr(args, "batch_size", 1)
    if batch_size < 1:
        raise RequestError(f"--batch_size {batch_size}: must be at least 1")
    if getattr(args, "stream", False) and batch_size > 1:
        raise RequestError(
            f"--stream with --batch_size {batch_size}: streaming prints one answer at a time; use --batch_size 1"
        )


def check_request(
    args: argparse.Namespace, requests: list[Request], media_folder: Path, needs: str = "a prompt or media"
) -> tuple[Checkpoint, list[Request], GenerationSettings]:
    """Everything about a script's request that can be wrong, checked with small reads only.
    Returns the checkpoint, the requests as they will run (URLs fetched into `media_folder`)
    and the settings; raises RequestError."""
    check_common_flags(args)
    check_device(args.device_target)
    settings = generation_settings(args)
    checkpoint = resolve_checkpoint(args.model_name, args.allow_pickle_weights)
    check_settings(settings, checkpoint, getattr(args, "batch_size", 1))
    return checkpoint, check_requests(requests, checkpoint, settings, media_folder, needs), settings


def resolve_precision(device_target: str, dtype, attn_implementation) -> tuple[str, str]:
    """The device-dependent defaults: bfloat16 on Ascend, float32 on CPU (MindSpore's CPU
    backend has no bfloat16 matmul); flash attention on both, so that the CPU runs the code
    Ascend runs (mindone itself casts attention's inputs to float16). eager on request."""
    attn_implementation = attn_implementation or "flash_attention_2"
    if device_target == "CPU":
        return "float32", attn_implementation
    return dtype or "bfloat16", attn_implementation


def exit_for(error: RequestError) -> NoReturn:
    """The scripts' edge: a bad request is one line on stderr and exit code 2 (on every msrun rank)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
