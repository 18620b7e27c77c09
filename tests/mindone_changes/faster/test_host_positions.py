"""Positions computed in numpy (omni_helpers/mindone_changes/faster/host_positions.py, installed as fast paths) against
mindone's own code, which they replace: the 3-D rope index and the vision encoder's patch positions."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.mindone_changes.faster import fast_paths
from omni_helpers.mindone_changes.faster.host_positions import audio_output_length
from tests.reference import batch_inputs, processor_inputs, request_conversation

KINDS = {"text": False, "image_audio": False, "video": True, "silent_video": False}  # kind: heard with its soundtrack


def rope_arguments(inputs: dict, use_audio_in_video: bool) -> tuple:
    """The thinker's arguments to get_rope_index for processor outputs, as MindSpore tensors."""

    def tensor(name):
        return ms.Tensor(inputs[name]) if name in inputs else None

    audio = inputs.get("feature_attention_mask")
    return (
        tensor("input_ids"),
        tensor("image_grid_thw"),
        tensor("video_grid_thw"),
        tensor("attention_mask"),
        use_audio_in_video,
        None if audio is None else ms.Tensor(audio.sum(1)),
        tensor("video_second_per_grid"),
    )


def assert_same_positions(thinker, arguments):
    mindones = fast_paths.FAST_PATHS.original(fast_paths.ROPE_INDEX)(thinker, *arguments)
    ours = fast_paths.get_rope_index(thinker, *arguments)
    for theirs, mine in zip(mindones, ours):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        np.testing.assert_array_equal(mine.asnumpy(), theirs.asnumpy())  # the same floats


@pytest.mark.parametrize("kind", list(KINDS))
def test_positions_are_mindones_for_every_kind_of_request(mindone, tiny_checkpoint, sample_media, kind):
    inputs = processor_inputs(tiny_checkpoint, request_conversation(kind, sample_media), KINDS[kind])
    assert_same_positions(mindone.model.thinker, rope_arguments(inputs, KINDS[kind]))


def test_positions_are_mindones_for_padded_batches(mindone, tiny_checkpoint, sample_media, two_rows):
    """Left padding, and media counted across rows (the second row's image is the batch's second)."""
    assert_same_positions(mindone.model.thinker, rope_arguments(two_rows, False))
    mixed = [
        request_conversation("image_audio", sample_media),
        [{"role": "user", "content": "Hi"}],
        request_conversation("image_audio", sample_media),
    ]
    inputs = batch_inputs(tiny_checkpoint, mixed, False)
    assert inputs["attention_mask"].min() == 0 and len(inputs["image_grid_thw"]) == 2
    assert_same_positions(mindone.model.thinker, rope_arguments(inputs, False))


def test_fractional_seconds_per_grid_give_mindones_positions(mindone, tiny_checkpoint, sample_media):
    inputs = processor_inputs(tiny_checkpoint, request_conversation("silent_video", sample_media), False)
    inputs["video_second_per_grid"] = np.array([0.7], np.float32)  # 0.7 * 25 is not a float32 integer
    assert_same_positions(mindone.model.thinker, rope_arguments(inputs, False))


@pytest.mark.parametrize("heard", [True, False], ids=["with_soundtracks", "silent"])
def test_two_videos_in_one_request_each_keep_their_own_time_step(mindone, tiny_checkpoint, sample_media, heard):
    """Two videos with different seconds per grid: each video's positions use its own (one taken from the other
    changes every temporal position of the second video)."""
    video = {"type": "video", "video": str(sample_media["video"])}
    conversation = [{"role": "user", "content": [video, dict(video), {"type": "text", "text": "Compare the two."}]}]
    inputs = processor_inputs(tiny_checkpoint, conversation, heard)
    assert len(inputs["video_grid_thw"]) == 2
    inputs["video_second_per_grid"] = np.array([1.0, 0.5], np.float32)
    assert_same_positions(mindone.model.thinker, rope_arguments(inputs, heard))


@pytest.mark.parametrize("heard", [True, False], ids=["with_soundtracks", "silent"])
def test_a_batch_of_two_videos_keeps_each_rows_time_step(mindone, tiny_checkpoint, sample_media, heard):
    rows = [
        request_conversation("video" if heard else "silent_video", sample_media),
        [{"role": "user", "content": "Hi"}],
        request_conversation("video" if heard else "silent_video", sample_media),
    ]
    inputs = batch_inputs(tiny_checkpoint, rows, heard)
    inputs["video_second_per_grid"] = np.array([0.5, 1.5], np.float32)
    assert_same_positions(mindone.model.thinker, rope_arguments(inputs, heard))


def test_audio_output_length_is_the_encoders():
    from mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    for frames in (1, 2, 99, 100, 101, 199, 200, 345, 1000, 3001):
        assert audio_output_length(frames) == int(_get_feat_extract_output_lengths(ms.Tensor(frames)).asnumpy())


GRIDS = [[[1, 6, 8]], [[2, 4, 4], [1, 8, 6]], [[3, 2, 10]]]  # an image; a video then an image; a wide video


@pytest.mark.parametrize("grids", GRIDS, ids=["image", "video_and_image", "wide_video"])
@pytest.mark.parametrize("method", ["fast_pos_embed_interpolate", "rot_pos_emb"])
def test_vision_patch_positions_are_mindones(mindone, grids, method):
    """The same floats, for grids of several frames and shapes (sides in patches, multiples of the merge size)."""
    vision = mindone.model.thinker.visual
    grid = ms.Tensor(np.array(grids, np.int64))
    theirs = fast_paths.FAST_PATHS.original(f"{fast_paths.VISION}:{method}")(vision, grid)
    ours = getattr(vision, method)(grid)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())
