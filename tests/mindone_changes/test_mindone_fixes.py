"""Each fix for a mindone bug: the bug shows without it, and the fix matches the reference."""

from __future__ import annotations

import numpy as np
import pytest

from omni_helpers.mindone_changes.mindone_fixes import (
    MINDONE_FIXES,
    audio_chunks,
    conv_output_lengths,
    split_into_chunks,
)
from omni_helpers.mindone_changes.patches import install_patches


def test_chunk_bookkeeping():
    assert split_into_chunks(np.array([250]), 100) == [100, 100, 50]
    assert split_into_chunks(np.array([100, 30]), 100) == [100, 30]
    # The processor's own count of audio tokens (13 per full 100-frame chunk).
    assert conv_output_lengths(np.array([100, 250, 7])).tolist() == [13, 13 * 2 + 7, 1]


def test_audio_chunks_are_the_frames_cut_and_padded_with_zeros(runtime_cpu):
    import mindspore as ms

    features = np.random.default_rng(0).standard_normal((3, 250)).astype(np.float32)  # (mel, frames)
    chunks = audio_chunks(ms.Tensor(features), [100, 100, 30, 20]).asnumpy()
    assert chunks.shape == (4, 1, 3, 100)
    for chunk, (start, length) in enumerate([(0, 100), (100, 100), (200, 30), (230, 20)]):
        np.testing.assert_array_equal(chunks[chunk, 0, :, :length], features[:, start : start + length])
        assert not chunks[chunk, 0, :, length:].any()


@pytest.fixture(scope="module")
def audio_towers(tiny_checkpoint):
    import mindspore as ms
    import torch
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration as MindoneModel
    from transformers import Qwen3OmniMoeForConditionalGeneration as TorchModel

    from omni_helpers.runtime import setup_runtime

    setup_runtime("CPU")
    install_patches("CPU")
    mindone = MindoneModel.from_pretrained(tiny_checkpoint, dtype=ms.float32, attn_implementation="eager")
    reference = TorchModel.from_pretrained(tiny_checkpoint, dtype=torch.float32, attn_implementation="eager")
    return mindone.thinker.audio_tower, reference.thinker.audio_tower


def run_both(audio_towers, frames: int):
    import mindspore as ms
    import torch

    mindone, reference = audio_towers
    features = np.random.default_rng(0).standard_normal((128, frames)).astype(np.float32)
    lengths = np.array([frames], np.int64)
    expected = reference(torch.from_numpy(features), feature_lens=torch.from_numpy(lengths)).last_hidden_state
    actual = mindone(ms.Tensor(features), feature_lens=ms.Tensor(lengths)).last_hidden_state
    return actual.asnumpy(), expected.detach().numpy()


def test_audio_longer_than_one_chunk_fails_without_the_fix(audio_towers):
    MINDONE_FIXES.uninstall()
    try:
        with pytest.raises(Exception, match="TensorScatterUpdate|indices out of range|only one element"):
            actual, _ = run_both(audio_towers, 250)
    finally:
        install_patches("CPU")  # the fixes, and the faster paths layered on them, back in place


@pytest.mark.parametrize("frames", [60, 100, 250, 420])
def test_audio_encoder_matches_reference_at_any_length(audio_towers, frames):
    actual, expected = run_both(audio_towers, frames)
    assert actual.shape == expected.shape == (conv_output_lengths(np.array([frames]))[0], expected.shape[1])
    np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def silent_video_inputs(tiny_checkpoint, sample_media, runtime_cpu):
    from tests.reference import processor_inputs, request_conversation

    return processor_inputs(
        tiny_checkpoint, request_conversation("silent_video", sample_media), use_audio_in_video=False
    )


def test_a_video_watched_without_its_soundtrack_fails_without_the_fix(audio_towers, silent_video_inputs, mindone_model):
    """mindone's get_rope_index calls `.cpu()` on a MindSpore tensor (a PyTorch idiom)."""
    import mindspore as ms

    from omni_helpers.generation.inputs import to_mindspore

    inputs = to_mindspore(silent_video_inputs, ms.float32)
    MINDONE_FIXES.uninstall()
    try:
        with pytest.raises(AttributeError, match="cpu"):
            mindone_model.thinker(**inputs, use_audio_in_video=False)
    finally:
        install_patches("CPU")  # the fixes, and the faster paths layered on them, back in place
    logits = mindone_model.thinker(**inputs, use_audio_in_video=False).logits  # the parity tests compare these
    assert logits.shape[1] == silent_video_inputs["input_ids"].shape[1]


def test_with_the_faster_paths_installed_the_fixed_rope_index_gives_the_references_silent_video_positions(
    silent_video_inputs, mindone_model, reference
):
    """The faster paths replace get_rope_index but fall back to the function beneath them, and with --no-fast_paths
    that function runs alone: it must be mindone's as the fix corrects it, giving the reference's positions."""
    import mindspore as ms
    import torch

    from omni_helpers.mindone_changes.faster.fast_paths import FAST_PATHS, ROPE_INDEX

    beneath = FAST_PATHS.original(ROPE_INDEX)  # what the faster path falls back to
    arguments = {
        name: silent_video_inputs[name]
        for name in ("input_ids", "video_grid_thw", "attention_mask", "video_second_per_grid")
    }
    positions, deltas = beneath(
        mindone_model.thinker,
        ms.Tensor(arguments["input_ids"]),
        None,
        ms.Tensor(arguments["video_grid_thw"]),
        ms.Tensor(arguments["attention_mask"]),
        False,
        None,
        ms.Tensor(arguments["video_second_per_grid"]),
    )
    expected, expected_deltas = reference.model.thinker.get_rope_index(
        torch.from_numpy(arguments["input_ids"]),
        None,
        torch.from_numpy(arguments["video_grid_thw"]),
        torch.from_numpy(arguments["attention_mask"]),
        False,
        None,
        torch.from_numpy(arguments["video_second_per_grid"]),
    )
    np.testing.assert_array_equal(positions.asnumpy(), expected.numpy())
    np.testing.assert_array_equal(deltas.asnumpy().reshape(-1), expected_deltas.numpy().reshape(-1))


def test_the_generation_loop_reports_progress_on_stderr(capsys, runtime_cpu):
    import importlib

    loop = importlib.import_module("mindone.transformers.generation.utils")
    loop.print("==> sampling, step: 0")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "==> sampling, step: 0\n"
    MINDONE_FIXES.uninstall()
    try:
        assert not hasattr(loop, "print")  # without the fix, the builtin: stdout
    finally:
        install_patches("CPU")  # the fixes, and the faster paths layered on them, back in place


def test_the_faster_paths_stay_layered_on_the_fixes_after_a_test_removes_them(runtime_cpu):
    """The tests above take the fixes out and put everything back: the faster paths that replace the same
    methods must be in place again (else later tests would silently run without them)."""
    from mindone.transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    from omni_helpers.mindone_changes.faster import fast_paths

    assert modeling.Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index is fast_paths.get_rope_index
    assert modeling.Qwen3OmniMoeAudioEncoder.construct is fast_paths.audio_construct
