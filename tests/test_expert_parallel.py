"""Expert parallelism in one process: the ranks' partial MoE outputs add up to the whole
block's, and a rank keeps exactly its share of the checkpoint's experts. (The all-reduce
itself runs in the scripts' msrun tests.)"""

from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn

from omni_helpers.expert_parallel import keep_local_experts
from omni_helpers.sparse_moe import dispatch_experts, route
from omni_helpers.metrics import parameter_bytes
from omni_helpers.parallel import expert_range


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
        partials.append(dispatch_experts(experts, x, weights, selected, first_expert=share.start).asnumpy())
    assert all(p.shape == whole.shape for p in partials)
    assert all(np.abs(p).sum() > 0 for p in partials[:1])
    # Two experts per token (the tiny checkpoint's top-k): each rank adds its part to exact zeros,
    # and the all-reduce's one addition is the one the whole block makes, so the sum is exact.
    np.testing.assert_array_equal(sum(partials[1:], partials[0]), whole)


def test_a_rank_keeps_its_share_of_the_experts_and_nothing_else(tiny_checkpoint, mindone_model, runtime_cpu):
    from mindone.transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=ms.float32, attn_implementation="eager")
    whole_bytes = parameter_bytes(model)
    replaced = keep_local_experts(model, rank=1, world_size=2)
    assert replaced == len(model.thinker.model.layers) + len(model.talker.model.layers)
    block, original = blocks(model)["thinker"], blocks(mindone_model)["thinker"]
    assert block.local_experts == range(2, 4) and len(block.experts) == 2
    np.testing.assert_array_equal(block.experts[0].gate_proj.weight.asnumpy(), original.experts[2].gate_proj.weight.asnumpy())
    np.testing.assert_array_equal(block.gate.weight.asnumpy(), original.gate.weight.asnumpy())  # the router stays whole
    every_block = [layer.mlp for stage in (mindone_model.thinker, mindone_model.talker) for layer in stage.model.layers]
    dropped = sum(parameter_bytes(b.experts[i]) for b in every_block for i in (0, 1))
    assert dropped > 0 and parameter_bytes(model) == whole_bytes - dropped
    names = {param.name for param in block.get_parameters()}
    assert "thinker.model.layers.0.mlp.experts.2.gate_proj.weight" in names  # checkpoint names kept
