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

from omni_helpers.parallel.expert_parallel import ExpertParallelMoeBlock
from omni_helpers.parallel.sparse_moe import StackedExperts, dispatch_grouped, route, route_grouped, sparse_moe_forward

MODELING = "mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"


# ----------------------------------------------------------------------------- the stand-ins


def route_dropless(x, experts, expert_num, flag=2):
    return ops.moe_init_routing_v2(ms.Tensor(x), ms.Tensor(experts), 0, 0, expert_num, 0, flag, False)


def test_routing_sorts_slots_by_expert_stably_says_where_each_went_and_counts_them(runtime_cpu):
    rng = np.random.default_rng(0)
    tokens, topk, experts = 7, 3, 5
    x = rng.standard_normal((tokens, 4)).astype(np.float32)
    indices = rng.integers(0, experts - 1, (tokens, topk)).astype(np.int32)  # the last expert chosen by no token
    permuted, row_of_slot, sizes = route_dropless(x, indices, experts)
    row_of_slot = row_of_slot.asnumpy()
    assert row_of_slot.dtype == np.int32 and sorted(row_of_slot) == list(range(tokens * topk))
    slots = indices.reshape(-1)
    for slot, row in enumerate(row_of_slot):  # each slot's token is at the row it names
        np.testing.assert_array_equal(permuted.asnumpy()[row], x[slot // topk])
    experts_by_row = np.empty_like(slots)
    experts_by_row[row_of_slot] = slots
    assert list(experts_by_row) == sorted(slots)  # grouped by expert, ascending
    for expert in range(experts):  # within an expert, in token order
        rows = [row_of_slot[slot] for slot in np.flatnonzero(slots == expert)]
        assert rows == sorted(rows)
    assert sizes.dtype == ms.int32 and sizes.asnumpy().tolist() == np.bincount(slots, minlength=experts).tolist()
    cumulative = route_dropless(x, indices, experts, flag=1)[2].asnumpy()
    assert cumulative.tolist() == np.cumsum(np.bincount(slots, minlength=experts)).tolist()
    assert len(route_dropless(x, indices, experts, flag=0)) == 2  # no counts asked, none returned


def test_routing_matches_the_docstrings_rows_and_refuses_what_it_does_not_compute(runtime_cpu):
    x = np.array([[0.1, 0.2, 0.3], [0.2, 0.7, 0.8], [0.3, 0.3, 0.5]], np.float32)
    indices = np.array([[0, 1, 1], [2, 1, 1], [0, 0, 0]], np.int32)
    # the docstring's example drops to a capacity of 2; dropless, every slot keeps its row in the same order
    _, row_of_slot, _ = route_dropless(x, indices, 3)
    assert row_of_slot.asnumpy().tolist() == [0, 4, 5, 8, 6, 7, 1, 2, 3]
    with pytest.raises(NotImplementedError, match="dropless"):
        ops.moe_init_routing_v2(ms.Tensor(x), ms.Tensor(indices), 3, 2, 3, 1, 0, False)
    with pytest.raises(NotImplementedError, match="int32"):
        ops.moe_init_routing_v2(ms.Tensor(x), ms.Tensor(indices.astype(np.int64)), 0, 0, 3, 0, 2, False)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        route_dropless(x, indices, 2)


def grouped_matmul(x, weight, group_list, group_list_type=1):
    (out,) = generated_ops.grouped_matmul_v4(
        [ms.Tensor(x)],
        [ms.Tensor(weight)],
        group_list=ms.Tensor(group_list, ms.int64),
        split_item=3,
        group_type=0,
        group_list_type=group_list_type,
    )
    return out.asnumpy()


@pytest.mark.parametrize("group_list_type", [0, 1], ids=["ends", "sizes"])
def test_grouped_matmul_multiplies_each_group_of_rows_by_its_experts_weight(runtime_cpu, group_list_type):
    rng = np.random.default_rng(1)
    sizes = np.array([2, 0, 3, 1])  # an expert with no rows
    rows, k, n = int(sizes.sum()) + 2, 5, 3  # two rows past the last group
    x = rng.standard_normal((rows, k)).astype(np.float32)
    weight = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    out = grouped_matmul(x, weight, sizes if group_list_type else np.cumsum(sizes), group_list_type)
    start = 0
    for expert, size in enumerate(sizes):
        np.testing.assert_allclose(
            out[start : start + size], x[start : start + size] @ weight[expert], rtol=1e-6, atol=1e-6
        )
        start += size
    assert out.shape == (rows, n)
    # the two rows past the groups are unspecified on Ascend: one NaN, one large and finite here
    assert np.isnan(out[start]).all() and (out[start + 1] == 65504).all()


def test_grouped_matmul_refuses_what_it_does_not_compute(runtime_cpu):
    x, w = np.ones((2, 2), np.float32), np.ones((1, 2, 2), np.float32)
    with pytest.raises(NotImplementedError, match="split_item=3, group_type=0"):
        generated_ops.grouped_matmul_v4([ms.Tensor(x)], [ms.Tensor(w)], split_item=0, group_type=-1)
    with pytest.raises(ValueError, match="nor pass x's rows"):
        grouped_matmul(x, w, np.array([3]))
    with pytest.raises(NotImplementedError, match="float16 or both float32"):
        generated_ops.grouped_matmul_v4(
            [ms.Tensor(x).astype(ms.bfloat16)],
            [ms.Tensor(w).astype(ms.bfloat16)],
            group_list=ms.Tensor([2], ms.int64),
            split_item=3,
            group_type=0,
            group_list_type=1,
        )


def test_swiglu_is_silu_of_the_first_half_times_the_second(runtime_cpu):
    x = np.random.default_rng(6).standard_normal((3, 8)).astype(np.float32)
    a, b = x[:, :4], x[:, 4:]
    np.testing.assert_allclose(ops.swiglu(ms.Tensor(x)).asnumpy(), a / (1 + np.exp(-a)) * b, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="not divisible by 2"):
        ops.swiglu(ms.Tensor(np.ones((2, 3), np.float32)))


def test_unpermute_weights_and_adds_each_tokens_slots(runtime_cpu):
    rng = np.random.default_rng(2)
    tokens, topk = 5, 2
    x = rng.standard_normal((tokens, 3)).astype(np.float32)
    indices = rng.integers(0, 4, (tokens, topk)).astype(np.int32)
    probs = rng.random((tokens, topk)).astype(np.float32)
    permuted, row_of_slot, _ = route_dropless(x, indices, 4)
    out = ops.moe_token_unpermute(permuted * 2, row_of_slot, ms.Tensor(probs)).asnumpy()
    np.testing.assert_allclose(out, 2 * x * probs.sum(1, keepdims=True), rtol=1e-6)
    unweighted = ops.moe_token_unpermute(permuted, ms.Tensor(np.arange(tokens * topk, dtype=np.int32))).asnumpy()
    np.testing.assert_array_equal(unweighted, permuted.asnumpy())  # without probs, topk is 1
    with pytest.raises(ValueError, match="padded_mode"):
        ops.moe_token_unpermute(permuted, row_of_slot, padded_mode=True)


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


def grouped(block, hidden_states):
    """The routed experts' part of the block (all of them, or one rank's share), grouped."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    router_logits, weights, selected = route_grouped(block, flat)
    return dispatch_grouped(StackedExperts(block.experts), flat, weights, selected, router_logits.shape[-1]).asnumpy()


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
    partials = [grouped(ExpertParallelMoeBlock(block, rank, 2), x) for rank in range(2)]
    assert all(np.abs(p).sum() > 0 for p in partials)
    np.testing.assert_allclose(partials[0] + partials[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank_share", [False, True], ids=["whole_block", "expert_rank"])
def test_a_prompts_moe_layer_launches_9_operations_whole_and_12_as_one_expert_ranks_share(mindone_model, rank_share):
    """At most 12 launches per layer, counted as the benchmark counts them (MindSpore's profiler): 9 for the whole
    block; 11 for one rank's share, whose all-reduce (the 12th) is stood in for here by a Python function."""
    from scripts.benchmark import launches

    block = block_with(mindone_model, "thinker", 128, 8)
    if rank_share:
        block = ExpertParallelMoeBlock(block, 1, 2)
    block.experts = StackedExperts(block.experts)
    x = ms.Tensor(np.random.default_rng(6).standard_normal((1, 32, block.gate.weight.shape[1])).astype(np.float32))
    all_reduce = (lambda partial: partial) if rank_share else None

    def one_layer() -> dict:
        sparse_moe_forward(block, x, all_reduce)
        return {}

    one_layer()  # once before counting: first calls build caches
    count, _, _ = launches(one_layer)
    assert count == (11 if rank_share else 9)


def test_prompts_run_grouped_in_every_dtype_the_grouped_product_is_documented_for(mindone_model, monkeypatch):
    from omni_helpers.parallel import sparse_moe

    experts = StackedExperts(block_with(mindone_model, "thinker", 4, 2).experts)
    x = ms.Tensor(np.ones((5, 8), np.float32))
    assert all(sparse_moe.grouped_applies(experts, x.astype(dtype)) for dtype in (ms.float32, ms.float16, ms.bfloat16))
    assert not sparse_moe.grouped_applies(experts, x.astype(ms.float64))
    monkeypatch.setattr(sparse_moe, "PROMPT_DISPATCH", "loop")  # the benchmark's *_loop variants
    assert not sparse_moe.grouped_applies(experts, x)


def test_the_grouped_routing_gives_mindones_weights_and_experts(mindone_model):
    block = block_with(mindone_model, "thinker", 128, 8)
    x = ms.Tensor(np.random.default_rng(7).standard_normal((17, block.gate.weight.shape[1])).astype(np.float32))
    logits, weights, selected = route(block, x)
    grouped_logits, grouped_weights, grouped_selected = route_grouped(block, x)
    np.testing.assert_array_equal(grouped_logits.asnumpy(), logits.asnumpy())
    np.testing.assert_array_equal(grouped_selected.asnumpy(), selected.asnumpy())
    np.testing.assert_allclose(grouped_weights.asnumpy(), weights.asnumpy(), rtol=1e-6, atol=1e-7)


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
