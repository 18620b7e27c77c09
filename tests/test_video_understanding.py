"""video_understanding.py end to end, with the video's audio track: one process and msrun, against the reference."""

from __future__ import annotations

import pytest

import video_understanding
from tests.reference import processor_inputs
from tests.script_runs import (
    SAMPLING, TALKER_SAMPLING, check_both_ranks_ran, check_expert_parallel_as_one_process, check_metrics, check_parallel, check_run,
    decode, run_msrun, run_single,
)

NEW_TOKENS, TALKER_FRAMES = 8, 4


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, sample_media):
    return [
        "--device_target", "CPU", "--model_name", str(tiny_checkpoint), "--video", str(sample_media["video"]),
        "--prompt", "Describe this video.", "--max_new_tokens", str(NEW_TOKENS),
        "--return_audio", "--talker_max_new_tokens", str(TALKER_FRAMES),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def expected(argv, tiny_checkpoint, reference, runtime_cpu):
    args = video_understanding.parse_args(argv)
    assert args.use_audio_in_video  # on by default
    conversation = video_understanding.build_conversation(args)
    inputs = processor_inputs(
        tiny_checkpoint, conversation, True, min_pixels=args.min_pixels, max_pixels=args.max_pixels
    )
    assert "input_features" in inputs  # the soundtrack was heard
    generation = reference.generate(inputs, True, NEW_TOKENS, True, talker_new_tokens=TALKER_FRAMES)
    return decode(tiny_checkpoint, generation.tokens), generation.wav


def test_time_range_and_audio_switch_reach_the_video_item(argv):
    args = video_understanding.parse_args(argv + ["--video_start", "0.5", "--video_end", "1.5", "--no-use_audio_in_video"])
    item = video_understanding.build_conversation(args)[0]["content"][0]
    assert (item["video_start"], item["video_end"], item["fps"]) == (0.5, 1.5, 2.0)
    assert args.use_audio_in_video is False


def test_single_process_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_single("video_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    check_metrics(run, NEW_TOKENS, speech=True)
    check_parallel(run, tiny_plan, "none", with_talker=True)
    assert run.result["inputs"]["use_audio_in_video"] is True


def test_msrun_two_workers_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_msrun("video_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    check_both_ranks_ran(run)
    check_parallel(run, tiny_plan, "zero3", with_talker=True)  # the default under msrun


def test_msrun_expert_parallel_samples_exactly_as_one_process(argv, tiny_plan, tmp_path):
    """Sampling on: the same logits and the same random stream must give the same tokens and codec codes."""
    check_expert_parallel_as_one_process("video_understanding.py", argv + SAMPLING + TALKER_SAMPLING, tiny_plan, True, tmp_path)
