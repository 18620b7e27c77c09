"""video_understanding.py end to end, with the video's audio track and without it (a silent
clip, and a clip with sound but the flag off): one process and msrun, against the reference."""

from __future__ import annotations

import subprocess

import pytest

import video_understanding
from tests.script_runs import (
    SAMPLING,
    TALKER_SAMPLING,
    check_both_ranks_ran,
    check_expert_parallel_as_one_process,
    check_metrics,
    check_parallel,
    check_run,
    expected_answer,
    run_msrun,
    run_single,
)

NEW_TOKENS, TALKER_FRAMES = 8, 4


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, sample_media):
    return [
        "--device_target",
        "CPU",
        "--model_name",
        str(tiny_checkpoint),
        "--video",
        str(sample_media["video"]),
        "--prompt",
        "Describe this video.",
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--return_audio",
        "--talker_max_new_tokens",
        str(TALKER_FRAMES),
    ]


def expected_for(argv, checkpoint, reference):
    args = video_understanding.parse_args(argv)
    request = video_understanding.build_request(args)
    return expected_answer(
        reference, checkpoint, request.conversation, NEW_TOKENS, TALKER_FRAMES, args.use_audio_in_video
    )


@pytest.fixture(scope="module")
def expected(argv, tiny_checkpoint, reference, runtime_cpu):
    assert video_understanding.parse_args(argv).use_audio_in_video  # on by default
    return expected_for(argv, tiny_checkpoint, reference)


@pytest.fixture(scope="module")
def silent_video(sample_media, tmp_path_factory):
    path = tmp_path_factory.mktemp("silent") / "silent.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(sample_media["video"]), "-an", "-c:v", "copy", str(path)], check=True
    )
    return path


def test_time_range_and_audio_switch_reach_the_video_item(argv):
    args = video_understanding.parse_args(
        argv + ["--video_start", "0.5", "--video_end", "1.5", "--no-use_audio_in_video"]
    )
    item = video_understanding.build_request(args).conversation[0]["content"][0]
    assert (item["video_start"], item["video_end"], item["fps"]) == (0.5, 1.5, 2.0)
    assert args.use_audio_in_video is False


@pytest.mark.slow
def test_single_process_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_single("video_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    check_metrics(run, NEW_TOKENS, speech=True)
    check_parallel(run, tiny_plan, "none", with_talker=True)
    assert run.result["inputs"]["use_audio_in_video"] is True


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["silent", "with sound, flag off"])
def test_a_video_watched_without_its_soundtrack_matches_reference(
    clip, argv, silent_video, sample_media, tiny_checkpoint, reference, runtime_cpu, tmp_path
):
    """mindone 0.5.0 crashes here (`.cpu()` in get_rope_index) without the project's fix."""
    argv = argv + ["--no-use_audio_in_video"]
    if clip == "silent":
        argv[argv.index("--video") + 1] = str(silent_video)
    expected = expected_for(argv, tiny_checkpoint, reference)
    run = run_single("video_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    assert run.result["inputs"]["use_audio_in_video"] is False


@pytest.mark.slow
def test_msrun_two_workers_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_msrun("video_understanding.py", argv, tmp_path / "out")
    check_run(run, *expected)
    check_both_ranks_ran(run)
    check_parallel(run, tiny_plan, "zero3", with_talker=True)  # the default under msrun


@pytest.mark.slow
def test_msrun_expert_parallel_samples_exactly_as_one_process(argv, tiny_plan, tmp_path):
    """Sampling on: the same logits and the same random stream must give the same tokens and codec codes."""
    check_expert_parallel_as_one_process(
        "video_understanding.py", argv + SAMPLING + TALKER_SAMPLING, tiny_plan, True, tmp_path
    )
