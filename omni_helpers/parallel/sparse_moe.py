"""The forward of a sparse MoE block (the thinker's, or the talker's with its shared
expert), and the three ways it runs its experts:

- from device indices (`dispatch_on_device`), for a few tokens at a time (decoding): each
  token's chosen experts are gathered from the experts' weights stacked at load time
  (`StackedExperts`) and run as batched matrix products. Nothing is read back to the host:
  on an NPU the launch pipeline never stalls inside a MoE layer.
- grouped on the device (`dispatch_grouped`), for many tokens (a prompt) of a float16 or float32
  model: the slots permuted by expert and each of the three products one grouped product over the
  stacked experts (Ascend's MoE kernels; CPU stand-ins among the CPU fallbacks). No host read.
- from one host read of the routing (`dispatch_experts`), for many tokens otherwise (bfloat16, the
  benchmark's `*_loop` variants, experts not stacked): each chosen expert runs once on all its tokens.

Two features depend on this: the faster paths (every block, every expert) and expert
parallelism (one rank's share of the experts, plus an all-reduce), so it lives here,
imported by both. Under ZeRO-3 each rank stacks its 1/N of every expert's weights, and the
experts a step runs are all-gathered by device indices (`GatheredStackedExperts`).
"""

from __future__ import annotations

import mindspore as ms
import mindspore.ops.auto_generate as generated_ops  # grouped_matmul, looked up when called (CPU stand-in)
import numpy as np
from mindspore import Parameter, mint, nn, ops

# A decode step (one new token per row) of up to this many (token, expert) slots runs its experts
# from device indices: a batch of up to 16 rows at top-8. Prompts, and larger batches, read the
# routing once: gathering every slot's weights would copy more than running each expert once on
# its tokens (the image + audio prompt of the tiny checkpoint: 6.3 ms per layer gathered, 4.6 read once).
DEVICE_DISPATCH_MAX_SLOTS = 128
# How prompts (and batches past DEVICE_DISPATCH_MAX_SLOTS) run stacked experts: "grouped" (`dispatch_grouped`, no
# host read) or "loop" (`dispatch_experts`, one host read per layer and each chosen expert on its own: the
# benchmark's `optimized_loop`).
PROMPT_DISPATCH = "grouped"
# MindSpore 2.7.1 documents its grouped matmul (split into groups along M) for these only, not bfloat16: a
# bfloat16 model's prompts keep to the loop
GROUPED_DTYPES = (ms.float16, ms.float32)
SPARSE_MOE_BLOCKS = ("Qwen3OmniMoeThinkerTextSparseMoeBlock", "Qwen3OmniMoeTalkerTextSparseMoeBlock")  # mindone's
MOE_BLOCKS = (*SPARSE_MOE_BLOCKS, "ExpertParallelMoeBlock")  # and one rank's share of one (expert_parallel)


def route(block, hidden_states):
    """Router logits, the top-k weights (renormalised if configured) and the chosen experts, as mindone
    computes them."""
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


class StackedExperts(nn.Cell):
    """A MoE block's experts as three weights stacked along a first axis of experts, built once
    from the loaded experts (whose own weights are then let go: the bytes held stay the same).
    `experts[e](x)` runs expert e, so the host-read dispatch works on it unchanged."""

    def __init__(self, experts: nn.CellList):
        super().__init__()
        self.gate = Parameter(mint.stack([e.gate_proj.weight for e in experts]), name="gate", requires_grad=False)
        self.up = Parameter(mint.stack([e.up_proj.weight for e in experts]), name="up", requires_grad=False)
        self.down = Parameter(mint.stack([e.down_proj.weight for e in experts]), name="down", requires_grad=False)
        self.act_fn = experts[0].act_fn

    def __len__(self) -> int:
        return self.gate.shape[0]

    def __getitem__(self, expert: int):
        return lambda x: self.expert(expert, x)

    def expert(self, expert: int, x):
        gate, up, down = (w[0] for w in self.weights(ms.Tensor([expert], ms.int64)))
        return mint.matmul(self.act_fn(mint.matmul(x, gate.T)) * mint.matmul(x, up.T), down.T)

    def stacks(self):
        """The gate, up and down weights of every expert, stacked (what the grouped products take)."""
        return self.gate, self.up, self.down

    def weights(self, experts):
        """The gate, up and down weights of the experts numbered by `experts` (a device tensor), stacked."""
        return tuple(mint.index_select(w, 0, experts) for w in (self.gate, self.up, self.down))

    def slots(self, x, experts):
        """Row i of x through expert experts[i], for every row at once: (slots, hidden) -> (slots, hidden)."""
        gate, up, down = self.weights(experts)
        rows = x.unsqueeze(1)  # (slots, 1, hidden)
        inner = self.act_fn(mint.bmm(rows, gate.transpose(1, 2))) * mint.bmm(rows, up.transpose(1, 2))
        return mint.bmm(inner, down.transpose(1, 2)).squeeze(1)


class GatheredStackedExperts(StackedExperts):
    """ZeRO-3's experts, stacked: each rank holds its 1/N of every expert's weights, split along
    their first axis as mindone's ZeRO-3 splits every Linear weight, so the bytes held per rank do
    not change. The experts a step needs are picked by device indices from the local shards and
    all-gathered from every rank, one AllGather per weight for all of them: the same bytes as
    gathering each chosen expert's Linear weights, and no host read of the routing."""

    def __init__(self, experts: nn.CellList, world_size: int):
        # a weight whose first axis does not divide by N stays whole on every rank, as in mindone's ZeRO-3
        split = [
            split_by_zero3(getattr(experts[0], role)) for role in ("gate_proj", "up_proj", "down_proj")
        ]  # as `weights` orders them
        super().__init__(experts)
        self.split, self.world_size = split, world_size
        self.all_gather = ops.AllGather()  # the world group, where mindone's ZeRO-3 gathers

    def weights(self, experts):
        local = super().weights(experts)  # (k, rows / N, cols) each
        return tuple(self._gather(w) if split else w for w, split in zip(local, self.split))

    def stacks(self):
        """Every expert's weights whole: each split stack all-gathered once (one layer's experts, for a prompt)."""
        return tuple(self._gather(w) if split else w for w, split in zip(super().stacks(), self.split))

    def _gather(self, shard):
        k, rows, cols = shard.shape
        gathered = self.all_gather(shard).reshape(self.world_size, k, rows, cols)  # ranks' shards, rank by rank
        return gathered.transpose(1, 0, 2, 3).reshape(k, self.world_size * rows, cols)


def split_by_zero3(cell) -> bool:
    """Whether mindone's ZeRO-3 split this cell's weight (its wrapper gathers it on use)."""
    wrapper = getattr(cell, "param_wrapper_w", None)
    return bool(getattr(wrapper, "need_rewrite", False))


def dispatch_on_device(experts: StackedExperts, hidden_states, weights, selected, first_expert: int = 0):
    """Every (token, chosen expert) slot run from device indices, and combined per token in
    ascending expert order, as mindone adds them. Slots routed to another rank's experts
    (expert parallelism) count zero."""
    tokens, k = selected.shape
    ascending, order = mint.sort(selected, dim=1)
    slot_weights = mint.gather(weights, 1, order)
    local = ascending - first_expert
    mine = mint.logical_and(local >= 0, local < len(experts))
    index = mint.where(mine, local, mint.zeros_like(local)).reshape(-1)
    rows = hidden_states.unsqueeze(1).broadcast_to((tokens, k, hidden_states.shape[-1])).reshape(tokens * k, -1)
    outputs = experts.slots(rows, index) * (slot_weights * mine.astype(slot_weights.dtype)).reshape(-1, 1)
    outputs = outputs.reshape(tokens, k, -1)
    combined = outputs[:, 0]
    for i in range(1, k):
        combined = combined + outputs[:, i]
    return combined


def dispatch_grouped(
    experts: StackedExperts, hidden_states, weights, selected, first_expert: int = 0, experts_elsewhere: bool = False
):
    """Every chosen expert once on its tokens, with no host read: the (token, expert) slots permuted so that each
    expert's are adjacent (`ops.moe_token_permute`), the gate and up products as one grouped product each over
    the stacked experts, SiLU-and-multiply, the down product grouped, and the slots un-permuted, weighted by
    their routing weights and added per token (`ops.moe_token_unpermute`). Ascend's kernels; on CPU the
    stand-ins among the CPU fallbacks. `experts_elsewhere`: expert parallelism, where slots routed to other ranks' experts
    sort after this rank's, outside every group, and count zero."""
    count = len(experts)
    selected, order = mint.sort(selected, dim=1)  # each token's slots by ascending expert: mindone's order of adding
    weights = mint.gather(weights, 1, order)
    local = selected - first_expert
    mine = mint.logical_and(local >= 0, local < count)
    index = mint.where(mine, local, mint.full_like(local, count)).astype(ms.int32)  # other ranks' slots: last
    permuted, sorted_indices = ops.moe_token_permute(hidden_states, index)
    sizes = ops.one_hot(index.reshape(-1), count + 1, ms.Tensor(1, ms.int64), ms.Tensor(0, ms.int64)).sum(0)
    ends = ops.cumsum(sizes[:count], 0)  # each expert's last slot + 1, on the device
    gate, up, down = experts.stacks()

    def grouped(x, stack):
        (out,) = generated_ops.grouped_matmul(
            [x], [stack], group_list=ends, split_item=3, group_type=0, transpose_b=True
        )
        return out

    inner = experts.act_fn(grouped(permuted, gate)) * grouped(permuted, up)
    out = grouped(inner, down)
    if experts_elsewhere:  # rows past the last group (other ranks' slots) may be left unwritten: zeroed, lest 0 x NaN
        written = (ops.arange(out.shape[0]) < ends[-1]).reshape(-1, 1)
        out = mint.where(written, out, mint.zeros_like(out))
    return ops.moe_token_unpermute(out, sorted_indices, weights * mine.astype(weights.dtype))


def stack_experts(model: nn.Cell, zero3_world_size: int = 0) -> int:
    """Replace the experts of every sparse MoE block (thinker and talker) by `StackedExperts`
    (`GatheredStackedExperts` after mindone's ZeRO-3 has split them over `zero3_world_size`
    ranks), so that decode steps run them from device indices; returns how many blocks changed.
    The experts' own weights are let go; `loading.shard_model` collects them, once, after every change."""
    stacked = 0
    for path, cell in model.cells_and_names():
        if type(cell).__name__ in MOE_BLOCKS and not isinstance(cell.experts, StackedExperts):
            cell.experts = (
                GatheredStackedExperts(cell.experts, zero3_world_size)
                if zero3_world_size
                else StackedExperts(cell.experts)
            )
            # named by the block's path (assignment names them "experts.gate", ...): a compiled graph holding
            # several layers' experts (`prompt_graph`) refuses two parameters of the same name
            cell.experts.update_parameters_name(f"{path}.experts.")
            stacked += 1
    return stacked


def grouped_applies(hidden_states) -> bool:
    """Whether a prompt's stacked experts run grouped (`dispatch_grouped`) rather than in the loop."""
    return PROMPT_DISPATCH == "grouped" and hidden_states.dtype in GROUPED_DTYPES


def sparse_moe_forward(block, hidden_states, first_expert: int = 0, all_reduce=None):
    """A sparse MoE block's forward (the thinker's, or the talker's with its shared expert).
    Under expert parallelism `block.experts` are this rank's share, numbered from
    `first_expert`, and `all_reduce` adds up the ranks' partial outputs before the
    replicated shared expert is added, once."""
    batch, length, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    router_logits, weights, selected = route(block, flat)
    decoding = length == 1 and flat.shape[0] * block.top_k <= DEVICE_DISPATCH_MAX_SLOTS  # one new token per row
    if isinstance(block.experts, StackedExperts) and decoding:
        routed = dispatch_on_device(block.experts, flat, weights, selected, first_expert)
    elif isinstance(block.experts, StackedExperts) and grouped_applies(flat):
        routed = dispatch_grouped(
            block.experts, flat, weights, selected, first_expert, experts_elsewhere=all_reduce is not None
        )
    else:
        routed = dispatch_experts(block.experts, flat, weights, selected, first_expert)
    if all_reduce is not None:
        routed = all_reduce(routed)
    shared_expert = getattr(block, "shared_expert", None)  # the talker's; the thinker has none
    if shared_expert is not None:
        routed = routed + mint.nn.functional.sigmoid(block.shared_expert_gate(flat)) * shared_expert(flat)
    return routed.reshape(batch, length, hidden), router_logits
