"""Expert parallelism (`--parallel expert`): each rank holds 1/N of every MoE layer's experts."""

from __future__ import annotations

import gc

from mindspore import Parameter, mint, nn, ops

from omni_helpers.parallel.sparse_moe import SPARSE_MOE_BLOCKS, sparse_moe_forward
from omni_helpers.request.parallel_modes import expert_range


class ExpertParallelMoeBlock(nn.Cell):
    """A sparse MoE block (the thinker's or the talker's) with one rank's share of the experts.

    Routing is computed in full on every rank; each rank runs the chosen experts it holds
    and one all-reduce adds up the ranks' partial outputs. The talker's shared expert is
    replicated and added after the all-reduce, once.

    The router's rows are rolled so that this rank's experts come first: the router then numbers
    them 0.. as `experts` does, and every other rank's expert `len(experts)` or more, with no
    renumbering per layer (sparse_moe's dispatches take experts numbered so). The experts a token
    chooses, and their weights, are the same; only their numbers change, in the router logits
    returned too (mindone records those of its own blocks only, for training).
    """

    def __init__(self, block: nn.Cell, rank: int, world_size: int):
        super().__init__(auto_prefix=False)  # keep the parameters' checkpoint names
        self.local_experts = expert_range(block.num_experts, rank, world_size)
        self.num_experts, self.top_k, self.norm_topk_prob = block.num_experts, block.top_k, block.norm_topk_prob
        self.gate = rolled_router(block.gate, self.local_experts.start)
        self.experts = nn.CellList([block.experts[i] for i in self.local_experts])
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, hidden_states):
        return sparse_moe_forward(self, hidden_states, self.all_reduce)


def rolled_router(router: nn.Cell, first: int) -> nn.Cell:
    """A copy of the router (a Linear without bias) whose output starts at expert `first`: rows first.., then 0.."""
    weight = router.weight
    rolled = mint.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    rolled.weight = Parameter(mint.cat((weight[first:], weight[:first])), requires_grad=False)
    return rolled


def keep_local_experts(model: nn.Cell, rank: int, world_size: int) -> int:
    """Replace every sparse MoE block by one holding only this rank's experts; returns how many were replaced.

    The other experts leave the model here, before the first forward, which is when
    MindSpore first copies a parameter to the device.
    """
    replaced = 0
    for _, cell in list(model.cells_and_names()):
        for name, child in list(cell.name_cells().items()):
            if type(child).__name__ in SPARSE_MOE_BLOCKS:
                checkpoint_names = {id(param): param.name for param in child.get_parameters()}
                rank_block = ExpertParallelMoeBlock(child, rank, world_size)
                checkpoint_names[id(rank_block.gate.weight)] = child.gate.weight.name  # the rolled router's copy
                setattr(cell, name, rank_block)
                for param in rank_block.get_parameters():  # setattr renamed them; keep the checkpoint's
                    param.name = checkpoint_names[id(param)]
                replaced += 1
    gc.collect()
    return replaced
