r"""Ask Qwen3-Omni about any mix of images, audio, video and text; get text, and speech if asked.

On Ascend, two NPUs, the model sharded with ZeRO-3 (add `--parallel expert` to give each NPU
half of the experts instead, with far less traffic per token; see the README):

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log \
        --join=True --cluster_time_out=300 omni_understanding.py \
        --model_name Qwen/Qwen3-Omni-30B-A3B-Instruct \
        --image cars.jpg --audio cough.wav \
        --prompt "What can you see and hear? Answer in one short sentence." \
        --return_audio

One process (CPU, the tiny test checkpoint):

    python omni_understanding.py --device_target CPU --model_name tiny_ckpt \
        --image sample_media/image.png --prompt "What is this?" --max_new_tokens 16

Rank 0 prints the answer and writes OUTPUT_DIR/result.json (and output.wav with
--return_audio). The Thinking checkpoint works too, for text only (it has no talker).
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
from omni_helpers.validation import check_request, exit_on_bad_request, load_conversation_file

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, DEFAULT_MODEL)
    add_media_args(parser)
    add_speech_args(parser)
    add_audio_in_video_arg(parser)
    return resolve_precision(parser.parse_args(argv))


def build_conversation(args: argparse.Namespace) -> list[dict]:
    if args.conversation:
        return load_conversation_file(args.conversation)
    turn = user_turn(args.prompt, images=args.image, audios=args.audio, videos=args.video)
    return with_system_prompt([turn], args.system_prompt)


def checked_request(args: argparse.Namespace) -> list[dict]:
    conversation = build_conversation(args)
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

    # 4. Chat template, media, processor
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
    result = {"model": args.model_name, "inputs": {"conversation": conversation, **media_in(conversation)}, "text": answer}

    wav = waveform_to_numpy(waveform)
    result["metrics"] = generation_metrics(
        clock, inputs["input_ids"].shape[1], thinker_times, talker_times,
        audio_seconds=0.0 if wav is None else len(wav) / SPEECH_SAMPLE_RATE, runtime=runtime, model=model,
    )  # fmt: skip

    # 7. Print and save (rank 0 only)
    return publish(runtime, args.output_dir, result, wav)


if __name__ == "__main__":
    main(parse_args())
