r"""Ask Qwen3-Omni about a video, watching its frames and (by default) listening to its audio track.

On Ascend, two NPUs, the model sharded with ZeRO-3 (add `--parallel expert` to give each NPU
half of the experts instead, with far less traffic per token; see the README):

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log \
        --join=True --cluster_time_out=300 video_understanding.py \
        --model_name Qwen/Qwen3-Omni-30B-A3B-Instruct \
        --video talk.mp4 --video_start 10 --video_end 40 \
        --prompt "What is said, and what happens on screen?" --return_audio

One process (CPU, the tiny test checkpoint):

    python video_understanding.py --device_target CPU --model_name tiny_ckpt \
        --video sample_media/video.mp4 --prompt "Describe this video." --max_new_tokens 16

The video's audio track is used unless --no-use_audio_in_video. Rank 0 prints the
answer and writes OUTPUT_DIR/result.json (and output.wav with --return_audio).
"""

from __future__ import annotations

import argparse

from omni_helpers.cli import add_audio_in_video_arg, add_common_args, add_media_args, add_speech_args, resolve_precision
from omni_helpers.conversation import media_in, user_turn, with_system_prompt
from omni_helpers.generation import decode_answer, generation_kwargs, progress_to_stderr, waveform_to_numpy
from omni_helpers.inputs import to_mindspore, videos_to_numpy
from omni_helpers.metrics import StageClock, count_forwards, generation_metrics
from omni_helpers.loading import load_model, load_processor
from omni_helpers.parallel import shard_model
from omni_helpers.outputs import SPEECH_SAMPLE_RATE, publish
from omni_helpers.runtime import setup_runtime
from omni_helpers.validation import RequestError, check_request, exit_on_bad_request, load_conversation_file, media_items

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
DEFAULT_FPS = 2.0  # frames sampled per second, as in the official usage


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, DEFAULT_MODEL)
    add_media_args(parser, image=False, audio=False)
    add_speech_args(parser)
    add_audio_in_video_arg(parser)
    video = parser.add_argument_group("video range and sampling")
    video.add_argument("--video_start", type=float, default=None, help="seconds into the video to start at")
    video.add_argument("--video_end", type=float, default=None, help="seconds into the video to stop at")
    video.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frames sampled per second")
    return resolve_precision(parser.parse_args(argv))


def video_options(args: argparse.Namespace) -> dict:
    """qwen_omni_utils reads the time range and frame rate from the video item itself."""
    options = {"fps": args.fps}
    if args.video_start is not None:
        options["video_start"] = args.video_start
    if args.video_end is not None:
        options["video_end"] = args.video_end
    return options


def build_conversation(args: argparse.Namespace) -> list[dict]:
    if args.conversation:
        return load_conversation_file(args.conversation)
    turn = user_turn(args.prompt, videos=args.video, video_options=video_options(args))
    return with_system_prompt([turn], args.system_prompt)


def checked_request(args: argparse.Namespace) -> list[dict]:
    conversation = build_conversation(args)
    if not any(kind == "video" for kind, _ in media_items(conversation)):
        raise RequestError("no video: give one with --video (or a video item in --conversation)")
    check_request(args, [conversation])
    return conversation


def main(args: argparse.Namespace) -> dict:
    from qwen_omni_utils import process_mm_info

    # 1. The request, checked before anything heavy (a bad one exits with code 2 on every rank)
    conversation = exit_on_bad_request(lambda: checked_request(args))

    # 2. Device, msrun ranks, and the CPU kernels if the device is CPU
    runtime = setup_runtime(args.device_target, args.seed, parallel=args.parallel)

    # 3. Load the processor and the model; spread it over msrun's workers as --parallel says
    clock = StageClock()
    with clock("load"):
        processor = load_processor(args.model_name, args.min_pixels, args.max_pixels)
        model = load_model(args, with_talker=args.return_audio)
        model = shard_model(model, runtime)  # --parallel: ZeRO-3, a share of the experts, or whole

    # 4. Chat template, frames and soundtrack, processor
    with clock("preprocessing"):
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        audios, images, videos = process_mm_info(conversation, use_audio_in_video=args.use_audio_in_video)
        inputs = processor(
            text=text,
            audio=audios,
            images=images,
            videos=videos_to_numpy(videos),
            return_tensors="np",
            padding=True,
            use_audio_in_video=args.use_audio_in_video,
        )
        inputs = to_mindspore(inputs, model.dtype)

    # 5. Generate text (thinker), and speech (talker + code2wav) if asked
    with clock("generate"), progress_to_stderr(), count_forwards(model.thinker) as thinker_times, \
            count_forwards(getattr(model, "talker", None)) as talker_times:  # fmt: skip
        text_ids, waveform = model.generate(
            **inputs,
            use_audio_in_video=args.use_audio_in_video,
            **generation_kwargs(args, model.config, return_audio=args.return_audio),
        )

    # 6. Decode
    answer = decode_answer(processor, text_ids, inputs["input_ids"].shape[1])
    result = {
        "model": args.model_name,
        "inputs": {"conversation": conversation, "use_audio_in_video": args.use_audio_in_video, **media_in(conversation)},
        "text": answer,
    }

    wav = waveform_to_numpy(waveform)
    result["metrics"] = generation_metrics(
        clock, inputs["input_ids"].shape[1], thinker_times, talker_times,
        audio_seconds=0.0 if wav is None else len(wav) / SPEECH_SAMPLE_RATE, runtime=runtime, model=model,
    )  # fmt: skip

    # 7. Print and save (rank 0 only)
    return publish(runtime, args.output_dir, result, wav)


if __name__ == "__main__":
    main(parse_args())
