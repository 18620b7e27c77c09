"""The forward of a sparse MoE block (the thinker's, or the talker's with its shared
expert), with the experts dispatched from one read of the routing.

Two features depend on it: the faster paths (every block, every expert) and expert
parallelism (one rank's share of the experts, plus an all-reduce), so it lives here,
imported by both.
"""

from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import mint


def route(block, hidden_states):
    """Router logits, the top-k weights (renormalised if configured) and the chosen experts, as mindone computes them."""
    router_logits = block.gate(hidden_states)
    weights = mint.nn.functional.softmax(router_logits, dim=1, dtype=ms.float32)
    weights, selected = mint.topk(weights, block.top_k, dim=-1)
    if block.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True)
    return router_logits, weights.to(hidden_states.dtype), selected


def dispatch_experts(experts, hidden_states, weights, selected, first_expert: int = 0):
    """Run every chosen expert once on its tokens and combine the results.

    `experts` are a block's experts numbered from `first_expert`: all of them, or one
    rank's share under expert parallelism, where slots routed to other ranks' experts
    contribute zeros. mindone loops over experts with two host synchronisations each
    (`.item()` and a nonzero) and accumulates with `index_add_`. Here the routing is read
    to the host once; the rest is gathers and adds whose indices come from that one read.
    Each token's contributions are added in ascending expert order, the order mindone's
    accumulation adds them, so results match to the last bit.
    """
    chosen = selected.asnumpy()  # (tokens, k): the one host synchronisation
    tokens, k = chosen.shape
    slots = chosen.reshape(-1) - first_expert
    local_slots = np.flatnonzero((slots >= 0) & (slots < len(experts)))
    if len(local_slots) == 0:
        return mint.zeros((tokens, hidden_states.shape[-1]), dtype=hidden_states.dtype)
    by_expert = local_slots[np.argsort(slots[local_slots], kind="stable")]  # grouped by expert, tokens in order
    local_experts, starts = np.unique(slots[by_expert], return_index=True)
    ends = [*starts[1:], len(by_expert)]
    flat_weights = weights.reshape(-1)
    outputs = []
    for expert, start, end in zip(local_experts.tolist(), starts.tolist(), ends):
        group = by_expert[start:end]
        rows = ms.Tensor((group // k).astype(np.int64))
        outputs.append(experts[expert](hidden_states[rows]) * flat_weights[ms.Tensor(group.astype(np.int64))][:, None])
    zero_row = len(by_expert)
    if zero_row < tokens * k:  # some slots belong to other ranks: they read a row of zeros
        outputs.append(mint.zeros((1, hidden_states.shape[-1]), dtype=hidden_states.dtype))
    stacked = mint.cat(outputs) if len(outputs) > 1 else outputs[0]

    row_of_slot = np.full(tokens * k, zero_row)
    row_of_slot[by_expert] = np.arange(len(by_expert))
    ascending = np.argsort(chosen, axis=1, kind="stable")
    rows = np.take_along_axis(row_of_slot.reshape(tokens, k), ascending, axis=1)  # (tokens, k)
    contributions = stacked[ms.Tensor(rows.T.reshape(-1).astype(np.int64))].reshape(k, tokens, -1)
    combined = contributions[0]
    for i in range(1, k):
        combined = combined + contributions[i]
    return combined


def sparse_moe_forward(block, hidden_states, first_expert: int = 0, all_reduce=None):
    """A sparse MoE block's forward (the thinker's, or the talker's with its shared expert)
    through `dispatch_experts`. Under expert parallelism `block.experts` are this rank's
    share, numbered from `first_expert`, and `all_reduce` adds up the ranks' partial
    outputs before the replicated shared expert is added, once."""
    batch, length, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    router_logits, weights, selected = route(block, flat)
    routed = dispatch_experts(block.experts, flat, weights, selected, first_expert)
    if all_reduce is not None:
        routed = all_reduce(routed)
    shared_expert = getattr(block, "shared_expert", None)  # the talker's; the thinker has none
    if shared_expert is not None:
        routed = routed + mint.nn.functional.sigmoid(block.shared_expert_gate(flat)) * shared_expert(flat)
    return routed.reshape(batch, length, hidden), router_logits
