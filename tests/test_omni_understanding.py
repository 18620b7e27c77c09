"""omni_understanding.py end to end: one process and msrun with 2 workers, against the PyTorch reference."""

from __future__ import annotations

import pytest

import omni_understanding
from tests.reference import processor_inputs
from tests.script_runs import (
    SAMPLING, TALKER_SAMPLING, check_both_ranks_ran, check_expert_parallel_as_one_process, check_metrics, check_parallel, check_run,
    decode, run_msrun, run_single,
)

NEW_TOKENS, TALKER_FRAMES = 8, 4


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, sample_media):
    return [
        "--device_target", "CPU", "--model_name", str(tiny_checkpoint),
        "--image", str(sample_media["image"]), "--audio", str(sample_media["audio"]),
        "--prompt", "What can you see and hear? Answer in one short sentence.",
        "--max_new_tokens", str(NEW_TOKENS), "--return_audio", "--talker_max_new_tokens", str(TALKER_FRAMES),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def expected(argv, tiny_checkpoint, reference, runtime_cpu):
    args = omni_understanding.parse_args(argv)
    conversation = omni_understanding.build_conversation(args)
    inputs = processor_inputs(
        tiny_checkpoint, conversation, args.use_audio_in_video, min_pixels=args.min_pixels, max_pixels=args.max_pixels
    )
    generation = reference.generate(inputs, args.use_audio_in_video, NEW_TOKENS, True, talker_new_tokens=TALKER_FRAMES)
    return decode(tiny_checkpoint, generation.tokens), generation.wav


def test_conversation_puts_media_before_the_question(argv, sample_media):
    conversation = omni_understanding.build_conversation(omni_understanding.parse_args(argv + ["--system_prompt", "Be brief."]))
    assert [m["role"] for m in conversation] == ["system", "user"]
    assert [item["type"] for item in conversation[1]["content"]] == ["image", "audio", "text"]
    assert conversation[1]["content"][0]["image"] == str(sample_media["image"].resolve())


def test_single_process_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_single("omni_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    check_metrics(run, NEW_TOKENS, speech=True)
    check_parallel(run, tiny_plan, "none", with_talker=True)
    assert run.result["inputs"]["image"] and run.result["inputs"]["audio"]


def test_msrun_two_workers_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_msrun("omni_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    check_both_ranks_ran(run)
    check_parallel(run, tiny_plan, "zero3", with_talker=True)  # the default under msrun


def test_msrun_expert_parallel_samples_exactly_as_one_process(argv, tiny_plan, tmp_path):
    """Sampling on: the same logits and the same random stream must give the same tokens and codec codes."""
    check_expert_parallel_as_one_process("omni_understanding.py", argv + SAMPLING + TALKER_SAMPLING, tiny_plan, True, tmp_path)
