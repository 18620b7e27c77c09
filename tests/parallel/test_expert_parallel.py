"""Expert parallelism in one process: the ranks' partial MoE outputs add up to the whole
block's, and a rank keeps exactly its share of the checkpoint's experts. (The all-reduce
itself runs in the scripts' msrun tests.)"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from omni_helpers.measuring.metrics import parameter_bytes
from omni_helpers.parallel.expert_parallel import keep_local_experts
from omni_helpers.parallel.sparse_moe import dispatch_experts, route
from omni_helpers.request.parallel_modes import expert_range


def blocks(model) -> dict:
    return {"thinker": model.thinker.model.layers[0].mlp, "talker": model.talker.model.layers[0].mlp}


@pytest.mark.parametrize("which", ["thinker", "talker"])
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_add_up_to_the_whole_block(mindone_model, which, tokens, world_size):
    block = blocks(mindone_model)[which]
    hidden = block.gate.weight.shape[1]
    x = ms.Tensor(np.random.default_rng(tokens).standard_normal((tokens, hidden)).astype(np.float32))
    _, weights, selected = route(block, x)
    whole = dispatch_experts(block.experts, x, weights, selected).asnumpy()
    partials = []
    for rank in range(world_size):
        share = expert_range(block.num_experts, rank, world_size)
        experts = nn.CellList([block.experts[i] for i in share])
        numbered = (selected - share.start) % block.num_experts  # as the rank's rolled router numbers them
        partials.append(dispatch_experts(experts, x, weights, numbered).asnumpy())
    assert all(p.shape == whole.shape for p in partials)
    assert all(np.abs(p).sum() > 0 for p in partials[:1])
    # Two experts per token (the tiny checkpoint's top-k): each rank adds its part to exact zeros,
    # and the all-reduce's one addition is the one the whole block makes, so the sum is exact.
    np.testing.assert_array_equal(sum(partials[1:], partials[0]), whole)


def test_a_rank_keeps_its_share_of_the_experts_and_nothing_else(tiny_checkpoint, mindone_model, runtime_cpu):
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=ms.float32, attn_implementation="eager"
    )
    whole_bytes = parameter_bytes(model)
    replaced = keep_local_experts(model, rank=1, world_size=2)
    assert replaced == len(model.thinker.model.layers) + len(model.talker.model.layers)
    block, original = blocks(model)["thinker"], blocks(mindone_model)["thinker"]
    assert block.local_experts == range(2, 4) and len(block.experts) == 2
    np.testing.assert_array_equal(
        block.experts[0].gate_proj.weight.asnumpy(), original.experts[2].gate_proj.weight.asnumpy()
    )
    # the router stays whole, its rows rolled so that this rank's experts come first
    np.testing.assert_array_equal(block.gate.weight.asnumpy(), np.roll(original.gate.weight.asnumpy(), -2, axis=0))
    every_block = [layer.mlp for stage in (mindone_model.thinker, mindone_model.talker) for layer in stage.model.layers]
    dropped = sum(parameter_bytes(b.experts[i]) for b in every_block for i in (0, 1))
    assert dropped > 0 and parameter_bytes(model) == whole_bytes - dropped
    names = {param.name for param in block.get_parameters()}
    assert "thinker.model.layers.0.mlp.experts.2.gate_proj.weight" in names  # checkpoint names kept
    assert "thinker.model.layers.0.mlp.gate.weight" in names


class StandInAllReduce:
    """The all-reduce of `world_size` ranks, run one rank after another in one process: a first pass records
    each rank's partial output (and hands it back unchanged), a second hands every rank the sum of them all."""

    def __init__(self):
        self.partials: dict[int, np.ndarray] = {}
        self.calls: list[int] = []

    def recording(self, rank: int):
        def all_reduce(x):
            self.calls.append(rank)
            self.partials[rank] = x.asnumpy()
            return x

        return all_reduce

    def summing(self, rank: int):
        def all_reduce(x):
            self.calls.append(rank)
            np.testing.assert_array_equal(x.asnumpy(), self.partials[rank])  # the same partial as in the first pass
            return ms.Tensor(sum(self.partials.values()))

        return all_reduce


@pytest.fixture(scope="module")
def loaded_blocks(tiny_checkpoint, runtime_cpu):
    """A model of its own (ranks' blocks hold its experts), its first MoE block of each stage."""
    from omni_helpers.loading import load_model

    return blocks(load_model(tiny_checkpoint, "float32", "eager", with_talker=True))


@pytest.mark.parametrize("which", ["thinker", "talker"])
@pytest.mark.parametrize("shape", [(5, 1), (1, 9)], ids=["decode_step_of_5_rows", "prompt_of_9_tokens"])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "loaded"])
def test_each_ranks_block_through_its_all_reduce_gives_the_whole_blocks_output(
    loaded_blocks, which, shape, world_size, stacked
):
    """The class a rank runs (`ExpertParallelMoeBlock`), its experts stacked as the scripts leave them (decode steps
    then run from device indices) or as loaded: every rank's output equals the whole block's at 1e-5, and each
    forward calls its all-reduce exactly once. A rank with the wrong experts, or a partial output left out of the
    sum (the talker's shared expert added before the all-reduce, say), changes the output."""
    from omni_helpers.mindone_changes.faster.fast_paths import FAST_PATHS
    from omni_helpers.parallel.expert_parallel import ExpertParallelMoeBlock
    from omni_helpers.parallel.sparse_moe import StackedExperts

    block = loaded_blocks[which]
    x = ms.Tensor(
        np.random.default_rng(world_size).standard_normal((*shape, block.gate.weight.shape[1])).astype(np.float32)
    )
    whole, whole_logits = FAST_PATHS.original(f"{type(block).__module__}.{type(block).__name__}:construct")(block, x)
    ranks = [ExpertParallelMoeBlock(block, rank, world_size) for rank in range(world_size)]
    if stacked:
        for rank_block in ranks:
            rank_block.experts = StackedExperts(rank_block.experts)
    all_reduce = StandInAllReduce()
    for rank, rank_block in enumerate(ranks):
        rank_block.all_reduce = all_reduce.recording(rank)
        rank_block(x)
    for rank, rank_block in enumerate(ranks):
        rank_block.all_reduce = all_reduce.summing(rank)
        output, logits = rank_block(x)
        np.testing.assert_allclose(output.asnumpy(), whole.asnumpy(), rtol=1e-5, atol=1e-5)
        first = rank_block.local_experts.start  # the router's logits, this rank's experts first
        np.testing.assert_array_equal(logits.asnumpy(), np.roll(whole_logits.asnumpy(), -first, axis=1))
    assert all_reduce.calls == [*range(world_size)] * 2
    assert sum(np.abs(partial).sum() > 0 for partial in all_reduce.partials.values()) >= 2  # the sum adds real parts
