"""audio_captioning.py end to end: one caption per audio, in batches, one process and msrun,
on the Instruct-shaped and the Captioner checkpoints, against the reference."""

from __future__ import annotations

import json

import pytest

import audio_captioning
from tests.script_runs import (
    SAMPLING,
    check_both_ranks_ran,
    check_expert_parallel_as_one_process,
    check_metrics,
    check_parallel,
    check_run,
    expected_answer,
    run_msrun,
    run_single,
)

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, sample_media, short_audio):
    # A second, shorter audio (one encoder chunk) so the two captions differ.
    return [
        "--device_target",
        "CPU",
        "--model_name",
        str(tiny_checkpoint),
        "--audio",
        str(sample_media["audio"]),
        "--audio",
        str(short_audio),
        "--max_new_tokens",
        str(NEW_TOKENS),
    ]


def captions_of(argv, checkpoint, reference) -> list[str]:
    """The reference's caption for each file alone."""
    requests = audio_captioning.build_requests(audio_captioning.parse_args(argv))
    return [expected_answer(reference, checkpoint, r.conversation, NEW_TOKENS)[0] for r in requests]


@pytest.fixture(scope="module")
def expected(argv, tiny_checkpoint, reference, runtime_cpu):
    captions = captions_of(argv, tiny_checkpoint, reference)
    assert len(captions) == 2 and captions[0] != captions[1]
    return captions


def test_each_audio_gets_its_own_audio_only_conversation(argv):
    requests = audio_captioning.build_requests(audio_captioning.parse_args(argv))
    assert [[item["type"] for item in r.conversation[0]["content"]] for r in requests] == [["audio"], ["audio"]]
    assert [r.id for r in requests] == [argv[5], argv[7]]  # filed under the files as given


@pytest.mark.slow
def test_single_process_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_single("audio_captioning.py", argv, tmp_path / "out")
    check_run(run, expected, None, extra_files={"results.jsonl"})
    check_metrics(run, 2 * NEW_TOKENS, speech=False)
    check_parallel(run, tiny_plan, "none", with_talker=False)
    assert run.stdout == f"{argv[5]}: {expected[0]}\n{argv[7]}: {expected[1]}\n"  # each caption names its file


@pytest.mark.slow
def test_msrun_two_workers_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_msrun("audio_captioning.py", argv, tmp_path / "out")
    check_run(run, expected, None, extra_files={"results.jsonl"})
    check_both_ranks_ran(run)
    check_parallel(run, tiny_plan, "zero3", with_talker=False)  # the default under msrun


@pytest.mark.slow
def test_msrun_expert_parallel_samples_exactly_as_one_process(argv, tiny_plan, tmp_path):
    """Sampling on: the same logits and the same random stream must give the same tokens and codec codes."""
    check_expert_parallel_as_one_process("audio_captioning.py", argv + SAMPLING, tiny_plan, False, tmp_path)


@pytest.mark.slow
def test_the_captioner_captions_three_files_in_one_batch_as_each_alone(
    tiny_captioner, sample_media, short_audio, references, runtime_cpu, tmp_path
):
    video_soundtrack = tmp_path / "soundtrack.mp4"  # an audio-only reading of the video file: a third, different length
    video_soundtrack.write_bytes(sample_media["video"].read_bytes())
    argv = [
        "--device_target",
        "CPU",
        "--model_name",
        str(tiny_captioner),
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--audio",
        str(sample_media["audio"]),
        "--audio",
        str(short_audio),
        "--audio",
        str(video_soundtrack),
    ]
    expected = captions_of(argv, tiny_captioner, references(tiny_captioner))
    run = run_single("audio_captioning.py", argv + ["--batch_size", "3"], tmp_path / "out")
    check_run(run, expected, None, extra_files={"results.jsonl"})
    lines = [json.loads(line) for line in (run.output_dir / "results.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == expected and {line["metrics"]["batch_size"] for line in lines} == {3}
