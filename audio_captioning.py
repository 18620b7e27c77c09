r"""Caption audio with Qwen3-Omni-30B-A3B-Captioner: one detailed caption per audio file, no prompt needed.

On Ascend, two NPUs, the model sharded with ZeRO-3 (add `--parallel expert` to give each NPU
half of the experts instead, with far less traffic per token; see the README):

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log \
        --join=True --cluster_time_out=300 audio_captioning.py \
        --model_name Qwen/Qwen3-Omni-30B-A3B-Captioner \
        --audio street.wav --audio kitchen.wav

One process (CPU, the tiny test checkpoint):

    python audio_captioning.py --device_target CPU --model_name tiny_ckpt \
        --audio sample_media/audio.wav --max_new_tokens 16

Rank 0 prints each caption and writes OUTPUT_DIR/result.json with `text` a list, one
caption per audio, in the order given. The Captioner speaks no answer: text only.
"""

from __future__ import annotations

import argparse

from omni_helpers.cli import add_common_args, add_media_args, resolve_precision
from omni_helpers.conversation import user_turn, with_system_prompt
from omni_helpers.generation import decode_answer, generation_kwargs, progress_to_stderr
from omni_helpers.inputs import to_mindspore
from omni_helpers.metrics import ForwardTimes, StageClock, count_forwards, generation_metrics
from omni_helpers.loading import load_model, load_processor
from omni_helpers.parallel import shard_model
from omni_helpers.outputs import publish
from omni_helpers.runtime import setup_runtime
from omni_helpers.validation import RequestError, check_request, exit_on_bad_request, load_conversation_file

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Captioner"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, DEFAULT_MODEL)
    add_media_args(parser, image=False, video=False)
    return resolve_precision(parser.parse_args(argv))


def build_conversations(args: argparse.Namespace) -> list[list[dict]]:
    """One conversation per audio: the Captioner takes the audio alone (a prompt is optional)."""
    if args.conversation:
        return [load_conversation_file(args.conversation)]
    return [with_system_prompt([user_turn(args.prompt, audios=[audio])], args.system_prompt) for audio in args.audio]


def checked_requests(args: argparse.Namespace) -> list[list[dict]]:
    conversations = build_conversations(args)
    if not conversations:
        raise RequestError("no audio: give one or more --audio files (or --conversation)")
    check_request(args, conversations, needs="audio file")
    return conversations


def main(args: argparse.Namespace) -> dict:
    from qwen_omni_utils import process_mm_info

    # 1. The requests, one per audio, checked before anything heavy (bad ones exit with code 2 on every rank)
    conversations = exit_on_bad_request(lambda: checked_requests(args))

    # 2. Device, msrun ranks, and the CPU kernels if the device is CPU
    runtime = setup_runtime(args.device_target, args.seed, parallel=args.parallel)

    # 3. Load the processor and the model (text only: no talker); spread it as --parallel says
    clock = StageClock()
    with clock("load"):
        processor = load_processor(args.model_name, args.min_pixels, args.max_pixels)
        model = load_model(args, with_talker=False)
        model = shard_model(model, runtime)  # --parallel: ZeRO-3, a share of the experts, or whole

    captions, prompt_tokens, thinker_times = [], 0, ForwardTimes()
    for conversation in conversations:
        # 4. Chat template, audio, processor
        with clock("preprocessing"):
            text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            audios, _, _ = process_mm_info(conversation, use_audio_in_video=False)
            inputs = processor(text=text, audio=audios, return_tensors="np", padding=True)
            inputs = to_mindspore(inputs, model.dtype)
        prompt_tokens += inputs["input_ids"].shape[1]

        # 5. Generate
        with clock("generate"), progress_to_stderr(), count_forwards(model.thinker, thinker_times):
            text_ids, _ = model.generate(**inputs, **generation_kwargs(args, model.config, return_audio=False))

        # 6. Decode
        captions.append(decode_answer(processor, text_ids, inputs["input_ids"].shape[1]))

    result = {"model": args.model_name, "inputs": {"audio": list(args.audio), "conversations": conversations}, "text": captions}
    result["metrics"] = generation_metrics(
        clock, prompt_tokens, thinker_times, ForwardTimes(), audio_seconds=0.0, runtime=runtime, model=model
    )

    # 7. Print and save (rank 0 only)
    return publish(runtime, args.output_dir, result, None)


if __name__ == "__main__":
    main(parse_args())
