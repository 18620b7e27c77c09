"""mindone on MindSpore CPU against transformers on PyTorch CPU, same tiny checkpoint, fp32.

For each request (text only; image + audio + text; video with its audio track) the
thinker's logits must agree, greedy generation must give the same tokens, and the talker
(greedy) must give the same codec codes and the same waveform.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference import MindOne, processor_inputs, relative_error, request_conversation, top2_margins

NEW_TOKENS = 16
LOGIT_TOLERANCE = 1e-4  # relative
WAV_TOLERANCE = 1e-3  # absolute
KINDS = ["text", "image_audio", "video"]


@pytest.fixture(scope="module")
def mindone(tiny_checkpoint):
    return MindOne(tiny_checkpoint)


@pytest.fixture(scope="module")
def requests(tiny_checkpoint, sample_media, mindone):  # mindone: runtime set up first
    return {
        kind: processor_inputs(tiny_checkpoint, request_conversation(kind, sample_media), kind == "video")
        for kind in KINDS
    }


def test_requests_exercise_every_input(requests):
    assert "pixel_values" in requests["image_audio"] and "input_features" in requests["image_audio"]
    assert "pixel_values_videos" in requests["video"] and "input_features" in requests["video"]
    # Audio longer than one 100-frame encoder chunk: the case mindone 0.5.0 gets wrong.
    assert requests["image_audio"]["feature_attention_mask"].sum() > 100
    assert requests["video"]["feature_attention_mask"].sum() > 100


@pytest.mark.parametrize("kind", KINDS)
def test_thinker_logits_match_reference(kind, requests, reference, mindone):
    use_audio_in_video = kind == "video"
    expected = reference.prefill_logits(requests[kind], use_audio_in_video)
    actual = mindone.prefill_logits(requests[kind], use_audio_in_video)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= LOGIT_TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_text_and_speech_match_reference(kind, requests, reference, mindone):
    use_audio_in_video = kind == "video"
    expected = reference.generate(requests[kind], use_audio_in_video, NEW_TOKENS, return_audio=True)
    actual = mindone.generate(requests[kind], use_audio_in_video, NEW_TOKENS, return_audio=True)

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


def test_fast_paths_change_nothing_but_speed(requests, mindone):
    """Stock mindone (fast paths removed) and the installed fast paths: same tokens, codes and speech."""
    from omni_helpers.fast_paths import install_fast_paths, uninstall_fast_paths

    inputs = requests["image_audio"]
    fast = mindone.generate(inputs, False, NEW_TOKENS, return_audio=True)
    uninstall_fast_paths()
    try:
        stock = mindone.generate(inputs, False, NEW_TOKENS, return_audio=True)
    finally:
        install_fast_paths("CPU")
    np.testing.assert_array_equal(fast.tokens, stock.tokens)
    assert relative_error(fast.step_logits, stock.step_logits) <= 1e-5
    np.testing.assert_array_equal(fast.codes, stock.codes)
    assert np.abs(fast.wav - stock.wav).max() <= 1e-5
