"""audio_captioning.py end to end: one caption per audio, one process and msrun, against the reference."""

from __future__ import annotations

import pytest

import audio_captioning
from tests.reference import processor_inputs
from tests.script_runs import (
    SAMPLING, check_both_ranks_ran, check_expert_parallel_as_one_process, check_metrics, check_parallel, check_run,
    decode, run_msrun, run_single,
)

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, sample_media, tmp_path_factory):
    # A second, shorter audio (one encoder chunk) so the two captions differ.
    import soundfile as sf

    wave, rate = sf.read(sample_media["audio"])
    short = tmp_path_factory.mktemp("short") / "short.wav"
    sf.write(short, wave[: rate * 3 // 4], rate)
    return [
        "--device_target", "CPU", "--model_name", str(tiny_checkpoint),
        "--audio", str(sample_media["audio"]), "--audio", str(short), "--max_new_tokens", str(NEW_TOKENS),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def expected(argv, tiny_checkpoint, reference, runtime_cpu):
    captions = []
    for conversation in audio_captioning.build_conversations(audio_captioning.parse_args(argv)):
        inputs = processor_inputs(tiny_checkpoint, conversation, False)
        captions.append(decode(tiny_checkpoint, reference.generate(inputs, False, NEW_TOKENS, False).tokens))
    assert len(captions) == 2 and captions[0] != captions[1]
    return captions


def test_each_audio_gets_its_own_audio_only_conversation(argv):
    conversations = audio_captioning.build_conversations(audio_captioning.parse_args(argv))
    assert [[item["type"] for item in c[0]["content"]] for c in conversations] == [["audio"], ["audio"]]


def test_single_process_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_single("audio_captioning.py", argv, tmp_path / "out")
    check_run(run, expected, None)
    check_metrics(run, 2 * NEW_TOKENS, speech=False)
    check_parallel(run, tiny_plan, "none", with_talker=False)
    assert len(run.result["inputs"]["audio"]) == 2


def test_msrun_two_workers_matches_reference(argv, expected, tiny_plan, tmp_path):
    run = run_msrun("audio_captioning.py", argv, tmp_path / "out")
    check_run(run, expected, None)
    check_both_ranks_ran(run)
    check_parallel(run, tiny_plan, "zero3", with_talker=False)  # the default under msrun


def test_msrun_expert_parallel_samples_exactly_as_one_process(argv, tiny_plan, tmp_path):
    """Sampling on: the same logits and the same random stream must give the same tokens and codec codes."""
    check_expert_parallel_as_one_process("audio_captioning.py", argv + SAMPLING, tiny_plan, False, tmp_path)
