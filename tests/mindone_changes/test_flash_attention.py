"""The path users run on Ascend, on CPU: mindone with `attn_implementation="flash_attention_2"`.

`ops.flash_attention_score` is the one Ascend-only kernel on that path; the CPU fallbacks
compute it in float32 (tested here against numpy). Everything around it is mindone's own
code: its flash wrapper (mask inversion, causal handling, the cast of queries, keys and
values to float16), the masks each model builds, the audio encoder's windows, the vision
encoder's blocks. Against the transformers reference (eager, float32):

- Tolerance for logits, 1e-3 of their range: the wrapper rounds queries, keys and values
  to float16 (relative 2^-11 = 4.9e-4 each) and the output once more, so a dot product
  carries about 1e-3; measured: at most 3.6e-4.
- Greedy tokens must be the reference's, and every step's top-2 gap must exceed twice the
  step's largest logit error, so that no choice could have flipped.
- Codec codes identical. Then the waveforms are code2wav's of the same codes, and they differ
  by exactly what code2wav alone makes of those codes on each path: its own attention runs
  in float16 too, and the tiny checkpoint's random decoder amplifies its 2e-4 relative error
  about 20-fold (3.7e-3 on the sample media; more on others). So the speech tolerance is
  derived per request, by decoding the reference's codes with both code2wavs, not fixed from
  one sample; the fixed bound the script and server tests use (`WAV_TOLERANCE_FLASH`) is
  checked against that derivation on the same media. The part of code2wav that attention
  touches (its transformer) is compared directly, within 1e-3.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.mindone_changes import cpu_fallbacks as fb
from omni_helpers.mindone_changes.mindone_fixes import conv_output_lengths
from tests.reference import (
    MindOne,
    Reference,
    batch_inputs,
    processor_inputs,
    relative_error,
    request_conversation,
    top2_margins,
)
from tests.script_runs import WAV_TOLERANCE_FLASH

FLASH_TOLERANCE = 1e-3  # relative to the logits' range: float16 rounding of q, k, v and the output
NEW_TOKENS = 16
KINDS = ["text", "image_audio", "video", "silent_video"]


# ----------------------------------------------------------------------------- the CPU kernel


def softmax_attention(q, k, v, discard, scale):
    """numpy, (B, N, S, D) float64, `discard` True where a query must not see a key."""
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("bnqd,bnkd->bnqk", q, k) * scale
    if discard is not None:
        scores = np.where(discard, -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bnqk,bnkd->bnqd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("layout", ["BSND", "BNSD"])
@pytest.mark.parametrize("mask", [None, "(S, S)", "(B, 1, S, S)", "(B, N, S, S)"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, as the thinker and talker use
def test_cpu_flash_attention_is_masked_softmax_attention(layout, mask, kv_heads):
    rng = np.random.default_rng(0)
    b, n, s, d = 2, 4, 5, 8
    q, k, v = (
        rng.standard_normal((b, n, s, d)),
        rng.standard_normal((b, kv_heads, s, d)),
        rng.standard_normal((b, kv_heads, s, d)),
    )
    shapes = {"(S, S)": (s, s), "(B, 1, S, S)": (b, 1, s, s), "(B, N, S, S)": (b, n, s, s)}
    discard = None if mask is None else np.triu(np.ones(shapes[mask], bool), 1) | (rng.random(shapes[mask]) < 0.2)
    if discard is not None:
        discard[..., 0] = False  # every query sees at least one key
    to_layout = (lambda x: x.transpose(0, 2, 1, 3)) if layout == "BSND" else (lambda x: x)
    out = fb.flash_attention_score(
        *(ms.Tensor(to_layout(x).astype(np.float16)) for x in (q, k, v)),
        head_num=n,
        attn_mask=None if discard is None else ms.Tensor(discard.astype(np.uint8)),
        scalar_value=d**-0.5,
        input_layout=layout,
    )
    assert out.dtype == ms.float16 and out.shape == to_layout(q).shape
    expected = softmax_attention(*(x.astype(np.float16).astype(np.float64) for x in (q, k, v)), discard, d**-0.5)
    np.testing.assert_allclose(out.asnumpy().astype(np.float64), to_layout(expected), atol=2e-3)


def test_a_query_that_sees_nothing_gets_a_finite_answer():
    q = ms.Tensor(np.ones((1, 2, 1, 4), np.float16))
    out = fb.flash_attention_score(
        q, q, q, head_num=1, attn_mask=ms.Tensor(np.ones((2, 2), np.uint8)), input_layout="BSND"
    )
    assert np.isfinite(out.asnumpy()).all()


@pytest.mark.parametrize("argument", [{"keep_prob": 0.9}, {"sparse_mode": 2}, {"input_layout": "TND"}, {"prefix": [1]}])
def test_what_mindone_never_passes_is_refused(argument):
    q = ms.Tensor(np.ones((1, 2, 1, 4), np.float16))
    with pytest.raises(NotImplementedError, match=next(iter(argument))):
        fb.flash_attention_score(q, q, q, head_num=1, **{"input_layout": "BSND", **argument})


# ----------------------------------------------------------------------------- against the reference


@pytest.fixture(autouse=True, scope="module")
def flash_attention_everywhere():
    """Prompts and encoders through PyNative's flash attention, as the released model runs its prompts
    on Ascend (the compiled prompt applies to the tiny checkpoint's few experts only, the compiled encoders
    up to 2,048 positions): this module tests mindone's flash path and its fixes. The compiled graphs are
    compared with this path in tests/mindone_changes/faster/test_prompt_graph.py and tests/mindone_changes/faster/test_encoder_graph.py."""
    from omni_helpers.mindone_changes.faster import encoder_graph, prompt_graph

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prompt_graph, "applies", lambda *args: False)
        patch.setattr(encoder_graph, "vision_applies", lambda vision: False)
        patch.setattr(encoder_graph, "audio_applies", lambda audio: False)
        yield


@pytest.fixture(scope="module")
def flash(tiny_checkpoint):
    return MindOne(tiny_checkpoint, attn_implementation="flash_attention_2")


@pytest.fixture(scope="module")
def requests(tiny_checkpoint, sample_media, flash):  # flash: runtime set up first
    return {
        kind: processor_inputs(tiny_checkpoint, request_conversation(kind, sample_media), kind == "video")
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_flash_logits_text_and_speech_match_the_reference(kind, requests, reference, flash):
    use_audio_in_video = kind == "video"
    assert (
        relative_error(
            flash.prefill_logits(requests[kind], use_audio_in_video),
            reference.prefill_logits(requests[kind], use_audio_in_video),
        )
        <= FLASH_TOLERANCE
    )

    expected = reference.generate(requests[kind], use_audio_in_video, NEW_TOKENS, return_audio=True)
    actual = flash.generate(requests[kind], use_audio_in_video, NEW_TOKENS, return_audio=True)
    assert relative_error(actual.step_logits, expected.step_logits) <= FLASH_TOLERANCE
    step_error = np.abs(actual.step_logits - expected.step_logits).max(axis=-1)
    assert (top2_margins(expected.step_logits) > 2 * step_error).all()  # no greedy choice could have flipped
    np.testing.assert_array_equal(actual.tokens, expected.tokens)
    np.testing.assert_array_equal(actual.codes, expected.codes)
    gap = code2wav_gap(flash, reference, expected.codes)  # what code2wav alone makes of these codes, path to path
    assert actual.wav.shape == expected.wav.shape and np.abs(actual.wav - expected.wav).max() <= gap * (1 + 1e-3) + 1e-6
    assert gap <= WAV_TOLERANCE_FLASH  # the fixed bound of the script and server tests, on the same media


def code2wav_gap(flash, reference, codes: np.ndarray) -> float:
    """The largest sample difference between the project's code2wav (flash attention, as Ascend runs it) and the
    reference's (eager, float32) decoding the same codes (groups, frames), chunked as `generate` decodes them."""
    import torch

    ours = flash.model.code2wav.chunked_decode(
        ms.Tensor(codes[None].astype(np.int64)), chunk_size=300, left_context_size=25
    )
    with torch.no_grad():
        theirs = reference.model.code2wav.chunked_decode(
            torch.from_numpy(codes[None].astype(np.int64)), chunk_size=300, left_context_size=25
        )
    return float(np.abs(ours.float().asnumpy().reshape(-1) - theirs.float().numpy().reshape(-1)).max())


def test_the_vision_encoder_attends_within_each_frame_block(requests, reference, flash):
    """The video's two temporal blocks: mindone's flash branch dropped `cu_seqlens` (fixed).
    The first block gets the same random hidden states in both implementations (on random
    weights its own are nearly alike everywhere, so attending across blocks would hardly show)."""
    import torch

    inputs = requests["silent_video"]
    assert inputs["video_grid_thw"][0, 0] == 2  # two blocks, so attending across them would show
    hidden = (
        np.random.default_rng(0)
        .standard_normal(
            (inputs["pixel_values_videos"].shape[0], flash.model.config.thinker_config.vision_config.hidden_size)
        )
        .astype(np.float32)
    )
    seen = {}

    def attention_output(name, block, run, to_numpy, tensor):
        def keep(module, args, out):  # returns nothing: the output stays as it is
            seen.setdefault(name, to_numpy(out))

        pre = block.register_forward_pre_hook(lambda module, args: (tensor(hidden), *args[1:]))
        post = block.attn.register_forward_hook(keep)
        try:
            run()
        finally:
            pre.remove()
            post.remove()

    with torch.no_grad():
        attention_output(
            "reference",
            reference.model.thinker.visual.blocks[0],
            lambda: reference.model.thinker.visual(
                torch.from_numpy(inputs["pixel_values_videos"]), grid_thw=torch.from_numpy(inputs["video_grid_thw"])
            ),
            lambda out: out.numpy(),
            torch.from_numpy,
        )
    attention_output(
        "project",
        flash.model.thinker.visual.blocks[0],
        lambda: flash.model.thinker.visual(
            ms.Tensor(inputs["pixel_values_videos"]), grid_thw=ms.Tensor(inputs["video_grid_thw"])
        ),
        lambda out: out.asnumpy(),
        ms.Tensor,
    )
    assert relative_error(seen["project"], seen["reference"]) <= FLASH_TOLERANCE


def test_code2wav_keeps_its_sliding_window_beyond_72_frames(reference, flash):
    """Speech longer than code2wav's window (72 frames, 5.8 s): mindone's flash path lost the window (fixed)."""
    import torch

    codes = np.random.default_rng(1).integers(0, 64, (1, 4, 100))
    code2wav_ms, code2wav_pt = flash.model.code2wav, reference.model.code2wav
    hidden_ms = code2wav_ms.code_embedding(ms.Tensor(codes) + code2wav_ms.code_offset).mean(1)
    actual = code2wav_ms.pre_transformer(inputs_embeds=hidden_ms).last_hidden_state.asnumpy()
    with torch.no_grad():
        hidden_pt = code2wav_pt.code_embedding(torch.from_numpy(codes) + code2wav_pt.code_offset).mean(1)
        expected = code2wav_pt.pre_transformer(inputs_embeds=hidden_pt).last_hidden_state.numpy()
    assert code2wav_ms.config.sliding_window < codes.shape[-1]
    assert relative_error(actual, expected) <= FLASH_TOLERANCE


def test_every_row_of_a_padded_batch_answers_as_alone(tiny_checkpoint, sample_media, short_audio, reference, flash):
    """Left padding reaches flash attention as a mask: mindone handed the 2-D padding mask to its wrapper (fixed)."""
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.request.settings import GenerationSettings

    question = {"type": "text", "text": "What can you see and hear? Answer in one short sentence."}
    conversations = [
        request_conversation("text", sample_media),
        request_conversation("image_audio", sample_media),
        [{"role": "user", "content": [{"type": "audio", "audio": str(short_audio)}, question]}],
    ]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, use_audio_in_video=False)
    answers = generate_from_inputs(
        flash.model, flash.processor, batch_inputs(tiny_checkpoint, conversations, False), settings
    )
    for conversation, answer in zip(conversations, answers):
        expected = reference.generate(processor_inputs(tiny_checkpoint, conversation, False), False, NEW_TOKENS, False)
        np.testing.assert_array_equal(np.array(answer.token_ids), expected.tokens)


# ----------------------------------------------------------------------------- audio longer than a window


@pytest.fixture(scope="module")
def windowed_reference(tiny_checkpoint):
    return Reference(tiny_checkpoint, audio_windows=True)


def audio_attention_output(model, frames: list[int]) -> np.ndarray:
    """What the audio encoder's first attention computes when its layer gets the same random
    hidden states in both implementations (on random weights the encoder's own features are
    nearly the same at every position, so which tokens a token may see would hardly show);
    the windows, the mask and everything after come from each encoder's own code."""
    import torch

    features = np.zeros((128, sum(frames)), np.float32)
    tokens = sum(int(n) for n in conv_output_lengths(np.array(frames)))
    hidden = np.random.default_rng(0).standard_normal((tokens, model.model.config.thinker_config.audio_config.d_model))
    layer = model.model.thinker.audio_tower.layers[0]
    seen = []
    if isinstance(model, Reference):
        pre = layer.register_forward_pre_hook(
            lambda module, args: (torch.from_numpy(hidden.astype(np.float32)), *args[1:])
        )
        post = layer.self_attn.register_forward_hook(
            lambda module, args, out: seen.append((out if isinstance(out, torch.Tensor) else out[0]).numpy())
        )
        with torch.no_grad():
            model.model.thinker.audio_tower(torch.from_numpy(features), feature_lens=torch.tensor(frames))
    else:
        pre = layer.register_forward_pre_hook(lambda cell, args: (ms.Tensor(hidden.astype(np.float32)), *args[1:]))
        post = layer.self_attn.register_forward_hook(lambda cell, args, out: seen.append(out.asnumpy()))
        model.model.thinker.audio_tower(ms.Tensor(features), feature_lens=ms.Tensor(np.array(frames, np.int64)))
    pre.remove()
    post.remove()
    return seen[0]


@pytest.mark.parametrize("attention", ["flash_attention_2", "eager"])
def test_audio_longer_than_a_window_attends_within_its_windows(
    attention, tiny_checkpoint, windowed_reference, reference
):
    """Two audios in one request, 2.6 and 1.5 windows long (8 s, 800 mel frames each), through
    the audio encoder of the project (both attention paths) and of the windowed reference."""
    frames = [2100, 1200]
    actual = audio_attention_output(MindOne(tiny_checkpoint, attention), frames)
    tolerance = FLASH_TOLERANCE if attention == "flash_attention_2" else 1e-5
    assert relative_error(actual, audio_attention_output(windowed_reference, frames)) <= tolerance
    # Attending across windows (transformers' eager path) gives something else: the test can tell.
    assert relative_error(actual, audio_attention_output(reference, frames)) > 10 * tolerance


@pytest.mark.parametrize("frames", [[99], [100], [101], [799], [800], [801], [1599, 1601], [2100, 1200, 450], [60, 60]])
def test_audio_window_boundaries_are_the_references(frames, windowed_reference, flash):
    """The windows the project's audio encoder uses are the ones transformers' encoder computes,
    for lengths on and around every chunk (100 frames) and window (800 frames) boundary."""
    import torch

    seen = {}

    def keep(name, cu_seqlens):  # a pre-hook that returns nothing leaves the inputs as they are
        seen.setdefault(name, [int(n) for n in cu_seqlens])

    handle = windowed_reference.model.thinker.audio_tower.layers[0].register_forward_pre_hook(
        lambda layer, args: keep("reference", args[1].numpy())
    )
    hook = flash.model.thinker.audio_tower.layers[0].register_forward_pre_hook(
        lambda cell, args: keep("project", args[1].asnumpy())
    )
    features = np.random.default_rng(0).standard_normal((128, sum(frames))).astype(np.float32)
    try:
        with torch.no_grad():
            windowed_reference.model.thinker.audio_tower(torch.from_numpy(features), feature_lens=torch.tensor(frames))
        flash.model.thinker.audio_tower(ms.Tensor(features), feature_lens=ms.Tensor(np.array(frames, np.int64)))
    finally:
        handle.remove()
        hook.remove()
    assert seen["project"] == seen["reference"]
