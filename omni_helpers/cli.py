"""Command-line flags shared by every script, with the same names and meaning everywhere."""

from __future__ import annotations

import argparse

from .parallel import PARALLEL_MODES

# The seed's processor limits (about 4 and 768 merged 28x28 patches); lower max_pixels if memory is short.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 14 * 14 * 768


def add_common_args(parser: argparse.ArgumentParser, default_model: str) -> argparse._ArgumentGroup:
    """Add the flags every script shares, as one named group; returns the group."""
    group = parser.add_argument_group("common options")
    group.add_argument("--model_name", default=default_model, help="hub id or local checkpoint directory")
    group.add_argument("--device_target", choices=["Ascend", "CPU"], default="Ascend",
                       help="CPU installs CPU kernels for Ascend-only ops and uses float32 with eager attention")
    group.add_argument("--prompt", default=None, help="the question or instruction")
    group.add_argument("--system_prompt", default=None, help="a system message placed before the request")
    group.add_argument("--conversation", default=None, metavar="FILE",
                       help="a JSON conversation in the official message format, instead of the media flags")
    group.add_argument("--max_new_tokens", type=int, default=1024, help="thinker tokens to generate at most")
    group.add_argument("--do_sample", action="store_true", help="sample the thinker (greedy by default)")
    group.add_argument("--temperature", type=float, default=0.6, help="thinker sampling temperature")
    group.add_argument("--top_p", type=float, default=0.95, help="thinker nucleus sampling")
    group.add_argument("--top_k", type=int, default=20, help="thinker top-k sampling")
    group.add_argument("--seed", type=int, default=0, help="random seed, the same on every rank")
    group.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS, help="image processor minimum pixels")
    group.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="image processor maximum pixels")
    group.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                       help="weights dtype (default bfloat16 on Ascend, float32 on CPU)")
    group.add_argument("--attn_implementation", choices=["flash_attention_2", "eager"], default=None,
                       help="attention kernel (default flash_attention_2 on Ascend, eager on CPU)")
    group.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                       help="how msrun's workers share the model: ZeRO-3 weight sharding, a share of the experts "
                            "each, or a whole copy each (default zero3 with several workers, none otherwise)")
    group.add_argument("--output_dir", default="outputs", help="where rank 0 writes result.json (and output.wav)")
    group.add_argument("--allow_pickle_weights", action="store_true",
                       help="also load .bin/.pt/.ckpt weights (unpickling runs code from the file; safetensors only by default)")
    return group


def add_media_args(parser: argparse.ArgumentParser, image: bool = True, audio: bool = True, video: bool = True) -> None:
    """Repeatable media flags: local path, file:// or http(s):// URL."""
    group = parser.add_argument_group("media (repeatable; local path, file:// or URL)")
    if image:
        group.add_argument("--image", action="append", default=[], help="an image")
    if audio:
        group.add_argument("--audio", action="append", default=[], help="an audio file")
    if video:
        group.add_argument("--video", action="append", default=[], help="a video file")


def add_speech_args(parser: argparse.ArgumentParser) -> None:
    """Flags for spoken output (Instruct checkpoints, which have a talker)."""
    group = parser.add_argument_group("speech output")
    group.add_argument("--return_audio", action="store_true", help="also speak the answer into output.wav")
    group.add_argument("--speaker", default="Ethan", help="voice of the spoken answer (e.g. Ethan, Chelsie, Aiden)")
    group.add_argument("--talker_max_new_tokens", type=int, default=4096, help="codec frames to generate at most")
    group.add_argument("--talker_do_sample", action="store_true", help="sample the talker (greedy by default)")


def add_audio_in_video_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--use_audio_in_video", action=argparse.BooleanOptionalAction, default=True,
                        help="also listen to each video's audio track (--no-use_audio_in_video to ignore it)")


def resolve_precision(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the device-dependent defaults: bf16 + flash attention on Ascend, fp32 + eager on CPU."""
    if args.device_target == "CPU":
        args.dtype, args.attn_implementation = "float32", "eager"
    else:
        args.dtype = args.dtype or "bfloat16"
        args.attn_implementation = args.attn_implementation or "flash_attention_2"
    return args
