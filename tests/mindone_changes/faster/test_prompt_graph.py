"""The compiled prompt (omni_helpers/mindone_changes/faster/prompt_graph.py) against the PyNative prompt it replaces."""

from __future__ import annotations

import types

import mindspore as ms
import numpy as np
import pytest

from omni_helpers.mindone_changes.faster import compiled, prompt_graph
from tests.reference import (
    falls_back_once,
    generate_both_ways,
    processor_inputs,
    relative_error,
    request_conversation,
    unbuildable,
)
from tests.reference import thinker_generate as generate

NEW_TOKENS = 6


def thinker_generate(mindone, inputs, graph: bool, monkeypatch):
    """The thinker's greedy generate with its prompt compiled, or in PyNative."""
    return generate(mindone, inputs, NEW_TOKENS, monkeypatch, None if graph else prompt_graph, do_sample=False)


def graphs_of(mindone) -> dict:
    return mindone.model.thinker.model.__dict__.get("_prompt_graphs", {})


def assert_prompt_matches(with_graph, pynative, attention_mask: np.ndarray):
    """Tokens identical; the prompt's hidden states (embeddings, every layer, final norm) and the cache
    within float rounding at every real position (left padding attends nothing on either path)."""
    np.testing.assert_array_equal(with_graph.sequences.asnumpy(), pynative.sequences.asnumpy())
    assert relative_error(with_graph.logits[0].asnumpy(), pynative.logits[0].asnumpy()) <= 1e-5
    assert len(with_graph.hidden_states[0]) == len(pynative.hidden_states[0])
    length = attention_mask.shape[1]
    for row, mask in enumerate(attention_mask):
        start = length - int(mask.sum())
        for ours, theirs in zip(with_graph.hidden_states[0], pynative.hidden_states[0]):
            assert ours.shape == theirs.shape
            assert relative_error(ours[row, start:].asnumpy(), theirs[row, start:].asnumpy()) <= 1e-5
        for ours, theirs in zip(with_graph.past_key_values.layers, pynative.past_key_values.layers):
            assert ours.keys.shape == theirs.keys.shape
            for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                assert relative_error(a[row, :, start:].asnumpy(), b[row, :, start:].asnumpy()) <= 1e-5


def test_compiled_prompt_gives_the_pynative_prompts_tokens_hidden_states_and_cache(mindone, two_rows, monkeypatch):
    graphs_of(mindone).clear()
    ours = thinker_generate(mindone, two_rows, True, monkeypatch)
    pynative = thinker_generate(mindone, two_rows, False, monkeypatch)
    rows, length = two_rows["input_ids"].shape
    assert list(graphs_of(mindone)) == [(rows, compiled.bucket_for(length), 0)], "the compiled prompt did not run"
    assert_prompt_matches(ours, pynative, two_rows["attention_mask"])


def test_compiled_prompt_with_an_image_and_audio_adds_deepstack_features_as_mindone_does(
    mindone, tiny_checkpoint, sample_media, monkeypatch
):
    inputs = processor_inputs(tiny_checkpoint, request_conversation("image_audio", sample_media), False)
    ours = thinker_generate(mindone, inputs, True, monkeypatch)
    pynative = thinker_generate(mindone, inputs, False, monkeypatch)
    deepstack = len(mindone.model.thinker.config.vision_config.deepstack_visual_indexes)
    assert deepstack > 0 and any(key[2] == deepstack for key in graphs_of(mindone)), (
        "no prompt graph with DeepStack ran"
    )
    assert_prompt_matches(ours, pynative, inputs["attention_mask"])


def test_speech_from_a_compiled_prompt_is_the_pynative_prompts(mindone, tiny_checkpoint, sample_media, monkeypatch):
    """The talker reads the thinker's prompt hidden states position by position."""
    inputs = processor_inputs(tiny_checkpoint, request_conversation("image_audio", sample_media), False)
    ours, pynative = generate_both_ways(mindone, inputs, monkeypatch, prompt_graph, talker_new_tokens=6)
    np.testing.assert_array_equal(ours.tokens, pynative.tokens)
    np.testing.assert_array_equal(ours.codes, pynative.codes)
    assert np.abs(ours.wav - pynative.wav).max() <= 1e-5


def test_every_expert_runs_only_where_that_costs_at_most_four_times_the_routed_work(mindone):
    mlp = mindone.model.thinker.model.layers[0].mlp
    experts = len(mlp.experts)
    assert prompt_graph.dense_experts_pay(mlp)  # the tiny checkpoint: 4 experts, top 2
    assert prompt_graph.dense_experts_pay(types.SimpleNamespace(experts=mlp.experts, top_k=experts // 4))
    released = types.SimpleNamespace(
        experts=mlp.experts, top_k=experts / 16
    )  # the released thinker's 128 experts, top 8
    assert not prompt_graph.dense_experts_pay(released)


def test_what_the_graph_does_not_cover_keeps_the_pynative_prompt(mindone, two_rows, monkeypatch):
    from mindone.transformers.cache_utils import DynamicCache

    text_model = mindone.model.thinker.model
    embeds = ms.ops.zeros((1, 4, text_model.config.hidden_size), ms.float32)
    empty = DynamicCache(config=text_model.config)
    assert prompt_graph.applies(text_model, embeds, empty, True, {})
    assert not prompt_graph.applies(text_model, embeds, empty, True, {"output_attentions": True})
    assert not prompt_graph.applies(text_model, embeds, empty, True, {"output_router_logits": True})
    assert not prompt_graph.applies(text_model, embeds, empty, False, {})  # no cache asked for
    assert not prompt_graph.applies(text_model, embeds, None, True, {})
    longest = ms.ops.zeros((1, compiled.BUCKET_MAX + 1, text_model.config.hidden_size), ms.float32)
    assert not prompt_graph.applies(text_model, longest, empty, True, {})  # flash attention's linear memory instead
    assert not prompt_graph.applies(mindone.model.talker.model, embeds, empty, True, {})  # the thinker's prompt only
    used = thinker_generate(mindone, two_rows, True, monkeypatch).past_key_values
    assert not prompt_graph.applies(text_model, embeds, used, True, {})  # a cache with positions: a decode step
    monkeypatch.setattr(text_model.rotary_emb, "rope_type", "dynamic")
    assert not prompt_graph.applies(text_model, embeds, empty, True, {})  # frequencies rescaled per call


@pytest.mark.parametrize("section", [[4, 2, 2], [24, 20, 20]], ids=["tiny", "released"])
def test_each_rotary_frequency_reads_the_axis_mindones_interleaving_gives_it(mindone, section):
    rotary = mindone.model.thinker.model.rotary_emb
    frequencies = sum(section)
    axis_values = np.broadcast_to(np.arange(1, 4, dtype=np.float32).reshape(3, 1, 1, 1), (3, 1, 1, frequencies))
    expected = rotary.apply_interleaved_mrope(ms.Tensor(axis_values.copy()), section).asnumpy().reshape(-1) - 1
    axes = prompt_graph.mrope_axes(section, frequencies)
    np.testing.assert_array_equal(axes.argmax(0), expected.astype(np.int64))
    np.testing.assert_array_equal(axes.sum(0), np.ones(frequencies))


def test_a_prompt_that_does_not_build_falls_back_to_pynative_and_says_why(
    mindone, two_rows, monkeypatch, capfd, tmp_path
):
    """Compiled on CPU only: a device where the prompt fails at its first call must still answer, and say why once."""
    monkeypatch.chdir(tmp_path)  # MindSpore writes a failed graph's analysis to ./rank_0/om
    expected = thinker_generate(mindone, two_rows, False, monkeypatch)
    text_model = mindone.model.thinker.model

    monkeypatch.setattr(prompt_graph, "prompt_step", unbuildable("OneHot"))
    monkeypatch.setitem(text_model.__dict__, "_prompt_graphs", {})  # no graph of this shape built yet
    results = falls_back_once(
        lambda: thinker_generate(mindone, two_rows, True, monkeypatch),
        text_model,
        "prompt_graph",
        capfd,
        "OneHot",
        "prompt",
        "running prompts step by step instead",
    )
    for result in results:
        np.testing.assert_array_equal(result.sequences.asnumpy(), expected.sequences.asnumpy())
