"""The thinker's prompt with its bookkeeping on the host (omni_helpers/mindone_changes/faster/thinker_prompt.py) against
mindone's forward it replaces."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.generation.inputs import to_mindspore
from omni_helpers.mindone_changes.faster import thinker_prompt
from tests.reference import batch_inputs, processor_inputs, request_conversation, thinker_generate

NEW_TOKENS = 4


def image_and_video(media) -> list[dict]:
    """An image and a video in one request: DeepStack's features of both, joined in prompt order."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(media["video"]), "min_pixels": 64 * 64, "max_pixels": 64 * 64},
                {"type": "image", "image": str(media["image"])},
                {"type": "text", "text": "Which came first?"},
            ],
        }
    ]


@pytest.fixture(scope="module")
def requests(tiny_checkpoint, sample_media, short_audio, mindone) -> dict:  # mindone: runtime set up first
    two_audios = [
        [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": str(sample_media["audio"])}, {"type": "text", "text": "Hm?"}],
            }
        ],
        [{"role": "user", "content": [{"type": "audio", "audio": str(short_audio)}]}],
    ]
    return {
        "image_audio": (
            processor_inputs(tiny_checkpoint, request_conversation("image_audio", sample_media), False),
            False,
        ),
        "video_heard": (processor_inputs(tiny_checkpoint, request_conversation("video", sample_media), True), True),
        "image_and_video": (processor_inputs(tiny_checkpoint, image_and_video(sample_media), False), False),
        "two_audios": (batch_inputs(tiny_checkpoint, two_audios, False), False),
    }


def run_both_ways(mindone, inputs, use_audio_in_video: bool, monkeypatch) -> tuple:
    """The thinker's greedy generate with the host bookkeeping, then with mindone's forward: each run's
    outputs and the rope deltas it left on the model; fails unless the host path ran in the first."""
    calls, forward = [], thinker_prompt.forward
    with monkeypatch.context() as patch:
        patch.setattr(thinker_prompt, "forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
        ours = thinker_generate(
            mindone, inputs, NEW_TOKENS, monkeypatch, use_audio_in_video=use_audio_in_video, do_sample=False
        )
    assert calls == [1], "the host bookkeeping did not run for the prompt"
    ours_deltas = mindone.model.thinker.rope_deltas.asnumpy()
    theirs = thinker_generate(
        mindone,
        inputs,
        NEW_TOKENS,
        monkeypatch,
        pynative=thinker_prompt,
        use_audio_in_video=use_audio_in_video,
        do_sample=False,
    )
    return ours, ours_deltas, theirs, mindone.model.thinker.rope_deltas.asnumpy()


@pytest.mark.parametrize("kind", ["image_audio", "video_heard", "two_audios"])
def test_host_bookkeeping_gives_mindones_prompt_bit_for_bit(mindone, requests, kind, monkeypatch):
    """Same merged embeddings, DeepStack features and positions, so the same bits everywhere after."""
    inputs, use_audio_in_video = requests[kind]
    ours, ours_deltas, theirs, their_deltas = run_both_ways(mindone, inputs, use_audio_in_video, monkeypatch)
    np.testing.assert_array_equal(ours.sequences.asnumpy(), theirs.sequences.asnumpy())
    np.testing.assert_array_equal(ours_deltas, their_deltas)
    assert ours_deltas.dtype == their_deltas.dtype == np.float32
    for a, b in zip(ours.logits, theirs.logits):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    assert len(ours.hidden_states[0]) == len(theirs.hidden_states[0])
    for a, b in zip(
        ours.hidden_states[0], theirs.hidden_states[0]
    ):  # the prompt's: embeddings, every layer, final norm
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_image_and_video_deepstack_features_join_in_prompt_order():
    """With both kinds in one prompt, the k-th visual position takes the next row of its own kind."""
    image_at, video_at = np.array([[0, 1, 1, 0, 0, 1, 0]], bool), np.array([[1, 0, 0, 1, 1, 0, 0]], bool)
    image, video = np.arange(3 * 2, dtype=np.float32).reshape(3, 2), -np.arange(1, 7, dtype=np.float32).reshape(3, 2)
    levels = {"image": [ms.Tensor(image)] * 2, "video": [ms.Tensor(video)] * 2}
    joint = thinker_prompt.merged_deepstack(levels, {"image": image_at, "video": video_at}, image_at | video_at)
    expected = np.stack([video[0], image[0], image[1], video[1], video[2], image[2]])
    assert len(joint) == 2
    for level in joint:
        np.testing.assert_array_equal(level.asnumpy(), expected)


def test_an_image_and_a_video_in_one_prompt_answer_where_mindones_forward_fails(mindone, requests, monkeypatch):
    """mindone joins the two kinds' DeepStack features with `new_zeros(mask.sum(), ...)`, a tensor where
    MindSpore wants an int (transformers' forward fails on the same prompt too, with a shape mismatch)."""
    inputs, _ = requests["image_and_video"]
    config = mindone.model.thinker.config
    ids = inputs["input_ids"][0]
    assert np.flatnonzero(ids == config.video_token_id)[0] < np.flatnonzero(ids == config.image_token_id)[0]
    answer = mindone.generate(inputs, False, NEW_TOKENS, return_audio=False)
    assert len(answer.tokens) == NEW_TOKENS and np.isfinite(answer.step_logits).all()
    with pytest.raises(TypeError, match="new_zeros"):
        thinker_generate(mindone, inputs, NEW_TOKENS, monkeypatch, pynative=thinker_prompt)


def test_audio_frames_are_mindones_boolean_selection(requests):
    inputs, _ = requests["two_audios"]
    features, mask = inputs["input_features"], inputs["feature_attention_mask"]
    assert mask.sum(1).min() < mask.shape[1]  # one audio is padded
    expected = features.transpose(0, 2, 1)[mask.astype(bool)].T
    np.testing.assert_array_equal(thinker_prompt.audio_frames(ms.Tensor(features), mask).asnumpy(), expected)


@pytest.mark.parametrize("kind,token", [("image", "image_token_id"), ("video", "video_token_id")])
def test_a_placeholder_count_that_does_not_match_the_media_is_mindones_error_before_any_encoder_runs(
    mindone, requests, kind, token, monkeypatch
):
    inputs, _ = requests["image_and_video"]
    thinker = mindone.model.thinker
    ids = inputs["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == getattr(thinker.config, token))[0]] = thinker.config.audio_token_id + 1  # text now
    broken = to_mindspore({**inputs, "input_ids": ids}, ms.float32)
    encoded = []
    monkeypatch.setattr(thinker, "get_image_features", lambda *args: encoded.append("image"))
    monkeypatch.setattr(thinker, "get_video_features", lambda *args: encoded.append("video"))
    with pytest.raises(ValueError) as ours:
        thinker_prompt.forward(thinker, past_key_values=None, **broken)
    assert encoded == []
    tokens = int((ids == getattr(thinker.config, token)).sum())
    label = {"image": "Image", "video": "Videos"}[kind]
    assert str(ours.value) == f"{label} features and image tokens do not match: tokens: {tokens}, features {tokens + 1}"
    monkeypatch.undo()
    with pytest.raises(ValueError) as theirs:  # mindone's own forward, the same message
        thinker(**broken)
    assert str(theirs.value) == str(ours.value)


def test_more_audio_placeholders_than_audio_features_is_a_one_line_error(runtime_cpu):
    """mindone's `masked_scatter` would run out of features; the message names both counts."""
    embeds = ms.Tensor(np.zeros((1, 5, 2), np.float32))
    placeholders = {"audio": np.array([[0, 1, 1, 1, 0]], bool)}
    with pytest.raises(ValueError, match=r"^Audio features and audio tokens do not match: tokens: 3, features 2$"):
        thinker_prompt.merged_embeddings(embeds, {"audio": ms.Tensor(np.ones((2, 2), np.float32))}, placeholders)


@pytest.mark.parametrize(
    "argument",
    ["inputs_embeds", "position_ids", "labels", "no_mask", "no_cache", "router_logits", "audio_without_mask"],
)
def test_what_the_host_bookkeeping_does_not_cover_keeps_mindones_forward(mindone, argument):
    from mindone.transformers.cache_utils import DynamicCache

    thinker = mindone.model.thinker
    arguments = {
        "input_ids": ms.Tensor([[1, 2]]),
        "attention_mask": ms.Tensor([[1, 1]]),
        "past_key_values": DynamicCache(),
        "input_features": ms.Tensor(np.zeros((1, 8, 4), np.float32)),
        "feature_attention_mask": ms.Tensor([[1] * 4]),
    }
    assert thinker_prompt.applies(thinker, arguments)
    changed = {
        "inputs_embeds": {"inputs_embeds": ms.Tensor(np.zeros((1, 2, 8), np.float32))},
        "position_ids": {"position_ids": ms.Tensor([[0, 1]])},
        "labels": {"labels": ms.Tensor([[1, 2]])},
        "no_mask": {"attention_mask": None},
        "no_cache": {"past_key_values": None},
        "router_logits": {"output_router_logits": True},
        "audio_without_mask": {"feature_attention_mask": None},
    }[argument]
    assert not thinker_prompt.applies(thinker, {**arguments, **changed})
