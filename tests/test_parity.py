"""mindone on MindSpore CPU against transformers on PyTorch CPU, same tiny checkpoint, fp32.

For each request (text only; image + audio + text; video with its audio track; video
watched without it) the thinker's logits must agree, greedy generation must give the same
tokens, and the talker (greedy) must give the same codec codes and the same waveform.
Batches: every row answers as its conversation does alone. Streaming: pieces arrive while
the thinker is still decoding and join to the answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference import (
    MindOne,
    batch_inputs,
    flatter_code_predictor,
    processor_inputs,
    relative_error,
    request_conversation,
    top2_margins,
)

NEW_TOKENS = 16
LOGIT_TOLERANCE = 1e-4  # relative
WAV_TOLERANCE = 1e-3  # absolute
KINDS = ["text", "image_audio", "video", "silent_video"]


def uses_audio_in_video(kind: str) -> bool:
    return kind == "video"  # "silent_video": the same clip, its soundtrack not used


@pytest.fixture(scope="module")
def requests(tiny_checkpoint, sample_media, mindone):  # mindone: runtime set up first
    return {
        kind: processor_inputs(tiny_checkpoint, request_conversation(kind, sample_media), uses_audio_in_video(kind))
        for kind in KINDS
    }


def test_requests_exercise_every_input(requests):
    assert "pixel_values" in requests["image_audio"] and "input_features" in requests["image_audio"]
    assert "pixel_values_videos" in requests["video"] and "input_features" in requests["video"]
    assert "pixel_values_videos" in requests["silent_video"] and "input_features" not in requests["silent_video"]
    # Audio longer than one 100-frame encoder chunk: the case mindone 0.5.0 gets wrong.
    assert requests["image_audio"]["feature_attention_mask"].sum() > 100
    assert requests["video"]["feature_attention_mask"].sum() > 100


@pytest.mark.parametrize("kind", KINDS)
def test_thinker_logits_match_reference(kind, requests, reference, mindone):
    expected = reference.prefill_logits(requests[kind], uses_audio_in_video(kind))
    actual = mindone.prefill_logits(requests[kind], uses_audio_in_video(kind))
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= LOGIT_TOLERANCE


@pytest.fixture(scope="module")
def fixes_only(tiny_checkpoint, mindone):
    """mindone with this project's bug fixes alone (`--no-fast_paths`): its experts as loaded; the faster paths are
    taken out for each of its generations (`generate_without_fast_paths`)."""
    return MindOne(tiny_checkpoint, stack_experts=False)


def generate_without_fast_paths(model: MindOne, *args, **kwargs):
    from omni_helpers.mindone_changes.patches import install_patches

    install_patches("CPU", fast_paths=False)
    try:
        return model.generate(*args, **kwargs)
    finally:
        install_patches("CPU")


@pytest.mark.parametrize(
    "fast_paths", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fast_paths", "fixes_only"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_text_and_speech_match_reference(kind, fast_paths, requests, reference, mindone, fixes_only):
    expected = reference.generate(requests[kind], uses_audio_in_video(kind), NEW_TOKENS, return_audio=True)
    if fast_paths:
        actual = mindone.generate(requests[kind], uses_audio_in_video(kind), NEW_TOKENS, return_audio=True)
    else:
        actual = generate_without_fast_paths(
            fixes_only, requests[kind], uses_audio_in_video(kind), NEW_TOKENS, return_audio=True
        )

    # Every greedy choice is clear: flipping one would take an error of half the top-2 gap,
    # five times what the tolerance allows (and the measured error is far below that).
    scale = np.abs(expected.step_logits).max()
    assert top2_margins(expected.step_logits).min() > 10 * LOGIT_TOLERANCE * scale
    assert relative_error(actual.step_logits, expected.step_logits) <= LOGIT_TOLERANCE

    assert len(expected.tokens) == NEW_TOKENS
    np.testing.assert_array_equal(actual.tokens, expected.tokens)

    assert expected.codes.shape[0] == 4 and expected.codes.shape[1] >= 2
    np.testing.assert_array_equal(actual.codes, expected.codes)

    assert actual.wav.shape == expected.wav.shape
    assert np.sqrt(np.mean(expected.wav**2)) > 0.01  # speech, not silence
    assert np.abs(actual.wav - expected.wav).max() <= WAV_TOLERANCE


@pytest.mark.parametrize("sampling_seed", [None, 7], ids=["greedy", "sampled"])
def test_fast_paths_change_nothing_but_speed(requests, mindone, fixes_only, sampling_seed):
    """Stock mindone (fast paths removed, experts as loaded) and the faster paths (experts stacked
    and run from device indices when decoding, no host reads in the step's bookkeeping, the
    decode loop, the talker's decode step and code predictor): the same tokens, codes and
    speech, greedy and sampled from the same seed (the code predictor's draws too)."""
    inputs = requests["image_audio"]
    with flatter_code_predictor(mindone.model), flatter_code_predictor(fixes_only.model):  # its draws not greedy
        fast = mindone.generate(inputs, False, NEW_TOKENS, return_audio=True, sampling_seed=sampling_seed)
        stock = generate_without_fast_paths(
            fixes_only, inputs, False, NEW_TOKENS, return_audio=True, sampling_seed=sampling_seed
        )
    np.testing.assert_array_equal(fast.tokens, stock.tokens)
    assert relative_error(fast.step_logits, stock.step_logits) <= 1e-5
    np.testing.assert_array_equal(fast.codes, stock.codes)
    assert np.abs(fast.wav - stock.wav).max() <= 1e-5


# ----------------------------------------------------------------------------- batches


def batch_of(kinds, media, short_audio) -> list[list[dict]]:
    question = {"type": "text", "text": "What can you see and hear? Answer in one short sentence."}
    conversations = {
        "short_audio": [{"role": "user", "content": [{"type": "audio", "audio": str(short_audio)}, question]}],
        "plain": [{"role": "user", "content": "Describe the sound of a short sentence."}],
    }
    return [conversations[k] if k in conversations else request_conversation(k, media) for k in kinds]


@pytest.mark.parametrize(
    "kinds",
    [
        ["text", "image_audio", "short_audio", "plain"],  # images, audio of two lengths, text: four prompt lengths
        ["video", "short_audio", "text"],  # a video with its soundtrack beside audio and text
    ],
    ids=["images", "video"],
)
def test_every_row_of_a_batch_answers_as_its_conversation_alone(
    kinds, tiny_checkpoint, sample_media, short_audio, reference, mindone
):
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.request.settings import GenerationSettings

    conversations = batch_of(kinds, sample_media, short_audio)
    use_audio_in_video = "video" in kinds
    batch = batch_inputs(tiny_checkpoint, conversations, use_audio_in_video)
    assert len(set(batch["attention_mask"].sum(axis=1))) == len(kinds)  # every row a different length: padding
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, use_audio_in_video=use_audio_in_video)
    answers = generate_from_inputs(mindone.model, mindone.processor, batch, settings)
    for conversation, answer in zip(conversations, answers):
        alone = processor_inputs(tiny_checkpoint, conversation, use_audio_in_video)
        expected = reference.generate(alone, use_audio_in_video, NEW_TOKENS, return_audio=False)
        single = generate_from_inputs(mindone.model, mindone.processor, alone, settings)[0]
        np.testing.assert_array_equal(np.array(answer.token_ids), expected.tokens)
        assert answer.token_ids == single.token_ids and answer.text == single.text
        assert answer.metrics["batch_size"] == len(kinds) and answer.metrics["thinker_new_tokens"] == len(
            answer.token_ids
        )


# ----------------------------------------------------------------------------- streaming


def test_streamed_pieces_arrive_while_the_thinker_decodes_and_join_to_the_answer(requests, mindone):
    """Order of events, not timings: each piece records how many thinker forwards had run."""
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.request.settings import GenerationSettings

    forwards = []
    handle = mindone.model.thinker.register_forward_hook(lambda *_: forwards.append(1))
    pieces = []
    try:
        answer = generate_from_inputs(
            mindone.model,
            mindone.processor,
            requests["text"],
            GenerationSettings(max_new_tokens=NEW_TOKENS),
            on_text=lambda row, piece: pieces.append((len(forwards), row, piece)),
        )[0]
    finally:
        handle.remove()
    assert "".join(piece for _, _, piece in pieces) == answer.text and len(pieces) > 1
    assert {row for _, row, _ in pieces} == {0}
    assert pieces[0][0] < len(forwards) == NEW_TOKENS  # the first piece left before the last forward ran
    assert [count for count, _, _ in pieces] == sorted(count for count, _, _ in pieces)
