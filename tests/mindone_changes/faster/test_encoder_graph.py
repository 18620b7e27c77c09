"""The compiled vision and audio encoders (omni_helpers/mindone_changes/faster/encoder_graph.py) against the PyNative encoders they replace."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.mindone_changes.faster import compiled, encoder_graph, fast_paths
from tests.reference import falls_back_once, processor_inputs, relative_error, request_conversation, unbuildable


def pixels(tiny_checkpoint, sample_media, kind: str) -> tuple:
    """(pixel values, grids) of a request: the image of "image_audio", the frames of "silent_video"."""
    inputs = processor_inputs(tiny_checkpoint, request_conversation(kind, sample_media), False)
    name = "" if kind == "image_audio" else "_videos"
    grid = "image_grid_thw" if kind == "image_audio" else "video_grid_thw"
    return ms.Tensor(inputs[f"pixel_values{name}"]), ms.Tensor(inputs[grid])


def pynative(vision, pixel_values, grid):
    return fast_paths.FAST_PATHS.original(f"{fast_paths.VISION}:construct")(vision, pixel_values, grid)


@pytest.mark.parametrize("kind", ["image_audio", "silent_video"], ids=["image", "video_frames"])
def test_compiled_encoder_gives_mindones_features_and_deepstack_features(mindone, tiny_checkpoint, sample_media, kind):
    """A video's frames attend within themselves: the frame mask is exercised there."""
    vision = mindone.model.thinker.visual
    pixel_values, grid = pixels(tiny_checkpoint, sample_media, kind)
    assert encoder_graph.vision_applies(vision)
    ours = encoder_graph.vision_forward(vision, pixel_values, grid)
    theirs = pynative(vision, pixel_values, grid)
    assert len(ours[1]) == len(theirs[1]) == len(vision.deepstack_visual_indexes) > 0
    for mine, reference in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        assert mine.shape == reference.shape
        assert relative_error(mine.asnumpy(), reference.asnumpy()) <= 1e-6
    if kind == "silent_video":
        assert int(grid.asnumpy()[0, 0]) > 1  # several frames
    patches = int(np.prod(grid.asnumpy(), axis=1).sum())
    assert (compiled.bucket_for(patches),) in vision.__dict__["_vision_graphs"]


def test_frames_see_only_themselves_and_padding_nothing():
    boundaries = encoder_graph.frame_boundaries(np.array([[2, 2, 2], [1, 2, 4]]))  # two frames of 4 patches, one of 8
    assert boundaries.tolist() == [0, 4, 8, 16]
    mask = encoder_graph.block_mask(boundaries, 32)
    visible = mask == 0
    assert visible[:4, :4].all() and visible[4:8, 4:8].all() and visible[8:16, 8:16].all()
    assert (
        not visible[:4, 4:].any()
        and not visible[4:8, 8:].any()
        and not visible[16:].any()
        and not visible[:, 16:].any()
    )


@pytest.mark.parametrize("name", list(encoder_graph.ACTIVATIONS))
def test_the_graphs_activation_is_the_configured_one(runtime_cpu, name):
    """On inputs large enough to tell the tanh approximation from erf (the tiny model's activations are not)."""
    from mindone.transformers.activations import ACT2FN

    from omni_helpers.mindone_changes.faster.graph_ops import gelu

    x = ms.Tensor(np.linspace(-6, 6, 2001, dtype=np.float32))
    np.testing.assert_allclose(
        gelu(x, encoder_graph.ACTIVATIONS[name]).asnumpy(), ACT2FN[name](x).asnumpy(), rtol=0, atol=1e-6
    )


def test_an_activation_the_graph_does_not_write_keeps_pynative(mindone, monkeypatch):
    vision = mindone.model.thinker.visual
    monkeypatch.setattr(vision.config, "hidden_act", "quick_gelu")
    assert not encoder_graph.vision_applies(vision)


def test_an_encoder_that_does_not_build_falls_back_to_pynative_and_says_why(
    mindone, tiny_checkpoint, sample_media, monkeypatch, capfd, tmp_path
):
    monkeypatch.chdir(tmp_path)  # MindSpore writes a failed graph's analysis to ./rank_0/om
    vision = mindone.model.thinker.visual
    pixel_values, grid = pixels(tiny_checkpoint, sample_media, "image_audio")
    expected = pynative(vision, pixel_values, grid)

    monkeypatch.setattr(encoder_graph, "vision_step", unbuildable("LayerNorm"))
    monkeypatch.setitem(vision.__dict__, "_vision_graphs", {})  # no graph of this shape built yet
    results = falls_back_once(
        lambda: vision(pixel_values, grid_thw=grid),
        vision,
        "vision_graph",
        capfd,
        "LayerNorm",
        "vision encoder",
        "running it step by step instead",
    )
    for merged, deepstack in results:
        np.testing.assert_array_equal(merged.asnumpy(), expected[0].asnumpy())
        for mine, reference in zip(deepstack, expected[1]):
            np.testing.assert_array_equal(mine.asnumpy(), reference.asnumpy())


def audio_features(tiny_checkpoint, sample_media, kind: str) -> tuple:
    """(mel features (mel, frames) of every audio, frames per audio) of a request, as the thinker passes them."""
    inputs = processor_inputs(tiny_checkpoint, request_conversation(kind, sample_media), kind == "video")
    mask = inputs["feature_attention_mask"].astype(bool)
    features = np.concatenate([inputs["input_features"][i][:, mask[i]] for i in range(len(mask))], axis=1)
    return ms.Tensor(features), ms.Tensor(mask.sum(1))


@pytest.mark.parametrize("kind", ["image_audio", "video"], ids=["audio", "video_soundtrack"])
def test_compiled_audio_encoder_gives_the_pynative_encoders_states(mindone, tiny_checkpoint, sample_media, kind):
    audio = mindone.model.thinker.audio_tower
    features, lengths = audio_features(tiny_checkpoint, sample_media, kind)
    assert encoder_graph.audio_applies(audio)
    ours = encoder_graph.audio_forward(audio, features, lengths).last_hidden_state
    theirs = fast_paths.FAST_PATHS.original(fast_paths.AUDIO_FORWARD)(audio, features, lengths).last_hidden_state
    assert ours.shape == theirs.shape and ours.shape[0] > 1
    assert relative_error(ours.asnumpy(), theirs.asnumpy()) <= 1e-6
    assert any(key[2] == compiled.bucket_for(ours.shape[0]) for key in audio.__dict__["_audio_graphs"])


def test_audio_tokens_attend_within_their_windows(mindone, tiny_checkpoint, sample_media, monkeypatch):
    """Windows of a few tokens (the tiny checkpoint's sample fits in one): the window mask is exercised."""
    audio = mindone.model.thinker.audio_tower
    features, lengths = audio_features(tiny_checkpoint, sample_media, "image_audio")
    monkeypatch.setattr(audio, "n_window_infer", audio.n_window * 2)  # one chunk's tokens per window
    monkeypatch.setitem(audio.__dict__, "_audio_graphs", {})
    ours = encoder_graph.audio_forward(audio, features, lengths).last_hidden_state
    theirs = fast_paths.FAST_PATHS.original(fast_paths.AUDIO_FORWARD)(audio, features, lengths).last_hidden_state
    whole = fast_paths.FAST_PATHS.original(fast_paths.AUDIO_FORWARD)
    assert relative_error(ours.asnumpy(), theirs.asnumpy()) <= 1e-6
    monkeypatch.setattr(audio, "n_window_infer", 800)
    assert (
        relative_error(ours.asnumpy(), whole(audio, features, lengths).last_hidden_state.asnumpy()) > 1e-4
    )  # windows matter


def test_compiled_audio_encoder_on_audios_several_windows_long(mindone):
    """Two audios of 2,100 and 1,200 frames (2.6 and 1.5 windows, 21 and 12 chunks): chunk and token
    padding, and windows across audios, against the PyNative encoder (which tests/mindone_changes/test_flash_attention.py
    holds to the windowed reference)."""
    audio = mindone.model.thinker.audio_tower
    frames = [2100, 1200]
    features = ms.Tensor(np.random.default_rng(0).standard_normal((128, sum(frames))).astype(np.float32))
    lengths = ms.Tensor(np.array(frames, np.int64))
    ours = encoder_graph.audio_forward(audio, features, lengths).last_hidden_state
    theirs = fast_paths.FAST_PATHS.original(fast_paths.AUDIO_FORWARD)(audio, features, lengths).last_hidden_state
    assert ours.shape == theirs.shape == (273 + 156, ours.shape[1])  # 13 tokens per 100 frames
    assert relative_error(ours.asnumpy(), theirs.asnumpy()) <= 1e-6


def test_encoders_beyond_the_largest_bucket_keep_pynative(mindone):
    """Attention written out over every pair of positions: past `BUCKET_MAX` the flash-attention path is kept."""
    vision, audio = mindone.model.thinker.visual, mindone.model.thinker.audio_tower
    merge = vision.spatial_merge_size
    side = 48 * merge  # 2,304 x 4 patches
    assert encoder_graph.vision_forward(vision, None, ms.Tensor(np.array([[1, side, side]], np.int64))) is None
    frames = 100 * (compiled.BUCKET_MAX // 13 + 1)  # 13 tokens per 100 frames
    features = ms.Tensor(np.zeros((128, frames), np.float32))
    assert encoder_graph.audio_forward(audio, features, ms.Tensor(np.array([frames], np.int64))) is None
