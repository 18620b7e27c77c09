"""The grouped MoE forward (omni_helpers/parallel/sparse_moe.py: dispatch_grouped) against mindone's own
per-expert loop, and the CPU stand-ins of Ascend's kernels it calls (mindone_changes/cpu_fallbacks.py)
against numpy written from their MindSpore 2.7.1 docstrings."""

from __future__ import annotations

import copy

import mindspore as ms
import mindspore.ops.auto_generate as generated_ops
import numpy as np
import pytest
from mindspore import ops

from omni_helpers.parallel.sparse_moe import StackedExperts, dispatch_grouped, route, sparse_moe_forward
from omni_helpers.request.parallel_modes import expert_range

MODELING = "mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"


# ----------------------------------------------------------------------------- the stand-ins


def test_permute_orders_slots_by_expert_stably_and_says_where_each_went(runtime_cpu):
    rng = np.random.default_rng(0)
    tokens, topk, experts = 7, 3, 5
    x = rng.standard_normal((tokens, 4)).astype(np.float32)
    indices = rng.integers(0, experts, (tokens, topk)).astype(np.int32)
    permuted, sorted_indices = ops.moe_token_permute(ms.Tensor(x), ms.Tensor(indices))
    sorted_indices = sorted_indices.asnumpy()
    assert sorted_indices.dtype == np.int32 and sorted(sorted_indices) == list(range(tokens * topk))
    slots = indices.reshape(-1)
    for slot, row in enumerate(sorted_indices):  # each slot's token is at the row it names
        np.testing.assert_array_equal(permuted.asnumpy()[row], x[slot // topk])
    experts_by_row = np.empty_like(slots)
    experts_by_row[sorted_indices] = slots
    assert list(experts_by_row) == sorted(slots)  # grouped by expert, ascending
    for expert in range(experts):  # within an expert, in token order
        rows = [sorted_indices[slot] for slot in np.flatnonzero(slots == expert)]
        assert rows == sorted(rows)


def test_permute_matches_the_docstrings_example(runtime_cpu):
    tokens = ms.Tensor([[1, 1, 1], [7, 7, 7], [2, 2, 2], [1, 1, 1], [2, 2, 2], [3, 3, 3]], ms.float32)
    permuted, sorted_indices = ops.moe_token_permute(tokens, ms.Tensor([5, 0, 3, 1, 2, 4], ms.int32))
    assert permuted.asnumpy()[:, 0].tolist() == [7, 1, 2, 2, 3, 1]
    assert sorted_indices.asnumpy().tolist() == [5, 0, 3, 1, 2, 4]


@pytest.mark.parametrize("transpose_b", [False, True])
def test_grouped_matmul_multiplies_each_group_of_rows_by_its_experts_weight(runtime_cpu, transpose_b):
    rng = np.random.default_rng(1)
    sizes = np.array([2, 0, 3, 1])  # an expert with no rows
    rows, k, n = int(sizes.sum()) + 2, 5, 3  # two rows past the last group
    x = rng.standard_normal((rows, k)).astype(np.float32)
    weight = rng.standard_normal((len(sizes), n, k) if transpose_b else (len(sizes), k, n)).astype(np.float32)
    (out,) = generated_ops.grouped_matmul(
        [ms.Tensor(x)],
        [ms.Tensor(weight)],
        group_list=ms.Tensor(np.cumsum(sizes), ms.int64),
        split_item=3,
        group_type=0,
        transpose_b=transpose_b,
    )
    expected = np.zeros((rows, n), np.float32)
    start = 0
    for expert, size in enumerate(sizes):
        w = weight[expert].T if transpose_b else weight[expert]
        expected[start : start + size] = x[start : start + size] @ w
        start += size
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-6, atol=1e-6)


def test_grouped_matmul_refuses_what_it_does_not_compute(runtime_cpu):
    x, w = [ms.Tensor(np.ones((2, 2), np.float32))], [ms.Tensor(np.ones((1, 2, 2), np.float32))]
    with pytest.raises(NotImplementedError, match="split_item=3, group_type=0"):
        generated_ops.grouped_matmul(x, w, split_item=0, group_type=-1)
    with pytest.raises(ValueError, match="increasing end per expert"):
        generated_ops.grouped_matmul(x, w, group_list=ms.Tensor([3], ms.int64), split_item=3, group_type=0)


def test_unpermute_weights_and_adds_each_tokens_slots(runtime_cpu):
    rng = np.random.default_rng(2)
    tokens, topk = 5, 2
    x = rng.standard_normal((tokens, 3)).astype(np.float32)
    indices = ms.Tensor(rng.integers(0, 4, (tokens, topk)).astype(np.int32))
    probs = rng.random((tokens, topk)).astype(np.float32)
    permuted, sorted_indices = ops.moe_token_permute(ms.Tensor(x), indices)
    out = ops.moe_token_unpermute(permuted * 2, sorted_indices, ms.Tensor(probs)).asnumpy()
    np.testing.assert_allclose(out, 2 * x * probs.sum(1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="padded_mode"):
        ops.moe_token_unpermute(permuted, sorted_indices, padded_mode=True)


# ----------------------------------------------------------------------------- the grouped block


def block_with(mindone_model, which: str, experts: int, top_k: int):
    """A thinker or talker MoE block of mindone's with `experts` experts (random weights, float32)."""
    stage = mindone_model.thinker if which == "thinker" else mindone_model.talker
    config = copy.deepcopy(stage.config.text_config)
    config.num_experts, config.num_experts_per_tok = experts, top_k
    ms.set_seed(experts + top_k)
    return type(stage.model.layers[0].mlp)(config)


def mindones_loop(block, hidden_states):
    from omni_helpers.mindone_changes.faster.fast_paths import FAST_PATHS

    forward = FAST_PATHS.original(f"{MODELING}.{type(block).__name__}:construct")
    out = forward(block, hidden_states)
    return (out[0] if isinstance(out, tuple) else out).asnumpy()


def grouped(block, hidden_states, first_expert=0, experts=None, experts_elsewhere=False):
    batch, length, hidden = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden)
    _, weights, selected = route(block, flat)
    stacked = StackedExperts(experts if experts is not None else block.experts)
    return dispatch_grouped(stacked, flat, weights, selected, first_expert, experts_elsewhere).asnumpy()


def routed_part(block, hidden_states, out):
    """mindone's output minus the talker's shared expert (added after the routed experts)."""
    if getattr(block, "shared_expert", None) is None:
        return out
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    shared = ops.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    return out.reshape(flat.shape[0], -1) - shared.asnumpy()


@pytest.mark.parametrize("which", ["thinker", "talker"])
@pytest.mark.parametrize("experts,top_k", [(4, 2), (128, 8)])  # the tiny checkpoint's, the released thinker's
def test_the_grouped_block_gives_mindones_hidden_states(mindone_model, which, experts, top_k):
    block = block_with(mindone_model, which, experts, top_k)
    hidden = block.gate.weight.shape[1]
    x = np.random.default_rng(3).standard_normal((2, 13, hidden)).astype(np.float32)
    x[0, :5] = 0.0  # a left-padded row: its padding is hidden states of zeros
    x = ms.Tensor(x)
    expected = mindones_loop(block, x).reshape(26, -1)
    block.experts = StackedExperts(block.experts)
    got = sparse_moe_forward(block, x)[0].asnumpy().reshape(26, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    _, _, selected = route(block, x.reshape(26, -1))
    if experts == 128:
        assert len(np.unique(selected.asnumpy())) < experts  # some expert chose no token


@pytest.mark.parametrize("which", ["thinker", "talker"])
def test_every_token_choosing_the_same_experts(mindone_model, which):
    block = block_with(mindone_model, which, 16, 4)
    hidden = block.gate.weight.shape[1]
    router = np.zeros((16, hidden), np.float32)
    router[[3, 7, 8, 12]] = [[0.04], [0.03], [0.02], [0.01]]  # on positive inputs these four always win
    block.gate.weight.set_data(ms.Tensor(router))
    x = ms.Tensor(np.random.default_rng(4).random((1, 9, hidden)).astype(np.float32) + 0.1)
    _, _, selected = route(block, x.reshape(9, -1))
    assert {tuple(sorted(row)) for row in selected.asnumpy().tolist()} == {(3, 7, 8, 12)}
    expected = routed_part(block, x, mindones_loop(block, x)).reshape(9, -1)
    np.testing.assert_allclose(grouped(block, x), expected, rtol=1e-5, atol=1e-5)


def test_each_ranks_share_adds_up_to_the_whole_block_and_other_ranks_slots_count_zero(mindone_model):
    block = block_with(mindone_model, "thinker", 128, 8)
    x = ms.Tensor(np.random.default_rng(5).standard_normal((1, 11, block.gate.weight.shape[1])).astype(np.float32))
    expected = mindones_loop(block, x).reshape(11, -1)
    partials = []
    for rank in range(2):
        share = expert_range(128, rank, 2)
        experts = [block.experts[i] for i in share]
        partials.append(grouped(block, x, share.start, experts, experts_elsewhere=True))
    assert all(np.abs(p).sum() > 0 for p in partials)
    np.testing.assert_allclose(partials[0] + partials[1], expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_prompts_keep_to_the_loop_as_the_grouped_product_is_documented_for_float16_and_32(
    runtime_cpu, monkeypatch
):
    from omni_helpers.parallel import sparse_moe

    x = ms.Tensor(np.ones((5, 8), np.float32))
    assert [sparse_moe.grouped_applies(x.astype(dtype)) for dtype in (ms.float32, ms.float16, ms.bfloat16)] == [
        True,
        True,
        False,
    ]
    monkeypatch.setattr(sparse_moe, "PROMPT_DISPATCH", "loop")  # the benchmark's *_loop variants
    assert not sparse_moe.grouped_applies(x)
    with pytest.raises(NotImplementedError, match="float16 or float32"):
        generated_ops.grouped_matmul(
            [x.astype(ms.bfloat16)],
            [ms.Tensor(np.ones((2, 3, 8), np.float32)).astype(ms.bfloat16)],
            group_list=ms.Tensor([2, 5], ms.int64),
            split_item=3,
            group_type=0,
            transpose_b=True,
        )


@pytest.fixture(scope="module")
def released_counts_model(tmp_path_factory, runtime_cpu):
    """A narrow checkpoint with the released depths and expert counts (128 experts, top 8 / top 6), loaded in
    float32 with its experts stacked as the scripts stack them for --parallel none."""
    import dataclasses

    from omni_helpers.loading import load_model, load_processor, shard_model
    from scripts.make_tiny_checkpoint import build_checkpoint

    path = tmp_path_factory.mktemp("released_counts")
    build_checkpoint(path, topology="released")
    model = load_model(path, "float32", "eager", with_talker=False)
    model = shard_model(model, dataclasses.replace(runtime_cpu, parallel="none"))
    return model, load_processor(path)


@pytest.mark.slow
@pytest.mark.parametrize("media", [False, True], ids=["text", "image_audio"])
def test_whole_prompts_at_the_released_expert_counts_give_the_loops_tokens_and_logits(
    released_counts_model, sample_media, media, monkeypatch
):
    from omni_helpers.generation.core import generate_answers
    from omni_helpers.parallel import sparse_moe
    from omni_helpers.request.settings import GenerationSettings

    model, processor = released_counts_model
    assert (
        model.thinker.model.layers[0].mlp.num_experts == 128
        and model.thinker.config.text_config.num_experts_per_tok == 8
    )
    parts = [
        {"type": "image", "image": str(sample_media["image"])},
        {"type": "audio", "audio": str(sample_media["audio"])},
    ]
    question = {"type": "text", "text": "Describe what you see and hear, then the weather, in a few words."}
    conversation = [{"role": "user", "content": (parts if media else []) + [question]}]
    settings = GenerationSettings(max_new_tokens=4, return_audio=False, use_audio_in_video=False)
    answers = {}
    for dispatch in ("loop", "grouped"):
        monkeypatch.setattr(sparse_moe, "PROMPT_DISPATCH", dispatch)
        (answers[dispatch],) = generate_answers(model, processor, [conversation], settings, keep_logits=True)
    assert answers["grouped"].token_ids == answers["loop"].token_ids
    np.testing.assert_allclose(answers["grouped"].step_logits, answers["loop"].step_logits, rtol=1e-5, atol=1e-5)
