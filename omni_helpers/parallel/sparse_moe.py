"""The forward of a sparse MoE block (the thinker's, or the talker's with its shared
expert), and the three ways it runs its experts:

- from device indices (`dispatch_on_device`), for a few tokens at a time (decoding): each
  token's chosen experts are gathered from the experts' weights stacked at load time
  (`StackedExperts`) and run as batched matrix products. Nothing is read back to the host:
  on an NPU the launch pipeline never stalls inside a MoE layer.
- grouped on the device (`dispatch_grouped`), for many tokens (a prompt): the slots sorted by
  expert and counted (`moe_init_routing_v2`), the gate-and-up and the down products one grouped
  product each over the stacked experts (`grouped_matmul_v4`), SwiGLU between, and the slots
  weighted back into their tokens (`moe_token_unpermute`): Ascend's MoE kernels, as
  vllm-mindspore runs them (CPU stand-ins among the CPU fallbacks). No host read.
- from one host read of the routing (`dispatch_experts`), for many tokens otherwise (the benchmark's
  `*_loop` variants, experts not stacked): each chosen expert runs once on all its tokens.

Two features depend on this: the faster paths (every block, every expert) and expert
parallelism (one rank's share of the experts, plus an all-reduce), so it lives here,
imported by both. Experts are numbered as the block's router numbers them; under expert
parallelism the router numbers this rank's experts first (`ExpertParallelMoeBlock`), so a slot
whose expert is numbered `len(experts)` or more is another rank's and counts zero here. Under
ZeRO-3 each rank stacks its 1/N of every expert's weights, and the experts a step runs are
all-gathered by device indices (`GatheredStackedExperts`).
"""

from __future__ import annotations

import functools

import mindspore as ms
import mindspore.ops.auto_generate as generated_ops  # grouped_matmul_v4, looked up when called (CPU stand-in)
import numpy as np
from mindspore import Parameter, mint, nn, ops

# A decode step (one new token per row) of up to this many (token, expert) slots runs its experts
# from device indices: a batch of up to 16 rows at top-8. Prompts, and larger batches, run each chosen
# expert once on its tokens (grouped, or after one read of the routing): gathering every slot's weights would
# copy more (the image + audio prompt of the tiny checkpoint: 6.3 ms per layer gathered, 4.6 read once).
DEVICE_DISPATCH_MAX_SLOTS = 128
# How prompts (and batches past DEVICE_DISPATCH_MAX_SLOTS) run stacked experts: "grouped" (`dispatch_grouped`, no
# host read) or "loop" (`dispatch_experts`, one host read per layer and each chosen expert on its own: the
# benchmark's `optimized_loop`).
PROMPT_DISPATCH = "grouped"
# MindSpore 2.7.1 documents its grouped matmul (GroupedMatmulV4, one tensor split into groups along M) for these
GROUPED_DTYPES = (ms.float16, ms.bfloat16, ms.float32)
SILU = ("SiLU", "SiLUActivation")  # the experts' activation SwiGLU computes (mindone's, mindspore's)
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


def route_grouped(block, hidden_states):
    """`route`'s numbers in fewer launches: with renormalised weights (the thinker's and the talker's
    configuration) the top-k weights are the softmax of the top-k router logits, since the softmax's
    denominator cancels; otherwise the softmax over every expert, then the top k. The experts as int32."""
    router_logits = block.gate(hidden_states)
    if block.norm_topk_prob:
        top, selected = ops.topk(router_logits, block.top_k, dim=-1)  # ops': int32 experts, as the routing takes
        weights = mint.nn.functional.softmax(as_dtype(top, ms.float32), dim=-1)
    else:
        probabilities = mint.nn.functional.softmax(as_dtype(router_logits, ms.float32), dim=1)
        weights, selected = ops.topk(probabilities, block.top_k, dim=-1)
    return router_logits, as_dtype(weights, hidden_states.dtype), selected


def as_dtype(tensor, dtype):
    """`tensor` in `dtype`, with no cast launched when it already is."""
    return tensor if tensor.dtype == dtype else tensor.astype(dtype)


def dispatch_experts(experts, hidden_states, weights, selected):
    """Run every chosen expert once on its tokens and combine the results.

    `experts` are a block's experts: all of them, or one rank's share under expert
    parallelism, where slots routed to other ranks' experts contribute zeros. mindone loops
    over experts with two host synchronisations each (`.item()` and a nonzero) and accumulates
    with `index_add_`. Here the routing is read to the host once; the rest is gathers and adds
    whose indices come from that one read.
    Each token's contributions are added in ascending expert order, the order mindone's
    accumulation adds them, so results match to the last bit.
    """
    chosen = selected.asnumpy()  # (tokens, k): the one host synchronisation
    tokens, k = chosen.shape
    slots = chosen.reshape(-1)
    local_slots = np.flatnonzero(slots < len(experts))
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
    """A MoE block's experts as two weights stacked along a first axis of experts, laid out as Ascend's grouped
    matmul takes them (inputs times weight, no transpose): `gate_up` (experts, hidden, 2 x inner), each expert's
    gate and up projections side by side as SwiGLU splits them, and `down` (experts, inner, hidden). Built once
    from the loaded experts, whose own weights are then let go: the bytes held stay the same.
    `experts[e](x)` runs expert e, so the host-read dispatch works on it unchanged."""

    def __init__(self, experts: nn.CellList):
        super().__init__()
        gate_up = [mint.cat([e.gate_proj.weight.T, e.up_proj.weight.T], dim=1) for e in experts]
        self.gate_up = Parameter(mint.stack(gate_up), name="gate_up", requires_grad=False)
        self.down = Parameter(mint.stack([e.down_proj.weight.T for e in experts]), name="down", requires_grad=False)
        self.act_fn = experts[0].act_fn

    def __len__(self) -> int:
        return self.gate_up.shape[0]

    def __getitem__(self, expert: int):
        return lambda x: self.expert(expert, x)

    def expert(self, expert: int, x):
        gate_up, down = (w[0] for w in self.weights(ms.Tensor([expert], ms.int64)))
        return mint.matmul(self.gated(mint.matmul(x, gate_up)), down)

    def gated(self, gate_up):
        """act(gate) x up, from the two halves of the gate-and-up product's last axis."""
        gate, up = mint.chunk(gate_up, 2, dim=-1)
        return self.act_fn(gate) * up

    def stacks(self):
        """Every expert's gate-and-up and down weights, stacked (what the grouped products take)."""
        return self.gate_up, self.down

    def weights(self, experts):
        """The gate-and-up and down weights of the experts numbered by `experts` (a device tensor), stacked."""
        return tuple(mint.index_select(w, 0, experts) for w in (self.gate_up, self.down))

    def slots(self, x, experts):
        """Row i of x through expert experts[i], for every row at once: (slots, hidden) -> (slots, hidden)."""
        gate_up, down = self.weights(experts)
        inner = self.gated(mint.bmm(x.unsqueeze(1), gate_up))  # (slots, 1, inner)
        return mint.bmm(inner, down).squeeze(1)


class GatheredStackedExperts(StackedExperts):
    """ZeRO-3's experts, stacked: each rank holds its 1/N of every expert's weights, split along the
    Linear weights' first axis (output features) as mindone's ZeRO-3 splits every Linear weight, so the
    bytes held per rank do not change. Stacked as `StackedExperts` lays them out, a rank's share is a slice
    of the last axis (of the gate's and of the up's halves). The experts a step needs are picked by device
    indices from the local shards and all-gathered from every rank, one AllGather per weight for all of
    them: the same bytes as gathering each chosen expert's Linear weights, and no host read of the routing."""

    def __init__(self, experts: nn.CellList, world_size: int):
        # a weight whose first axis does not divide by N stays whole on every rank, as in mindone's ZeRO-3
        gate_split, up_split = (split_by_zero3(getattr(experts[0], role)) for role in ("gate_proj", "up_proj"))
        if gate_split != up_split:
            raise ValueError(
                "ZeRO-3 split an expert's gate projection but not its up projection: they cannot be stacked"
            )
        self.split = (gate_split, split_by_zero3(experts[0].down_proj))  # as `weights` orders them
        super().__init__(experts)
        self.world_size = world_size
        self.all_gather = ops.AllGather()  # the world group, where mindone's ZeRO-3 gathers

    def weights(self, experts):
        local = super().weights(experts)
        return tuple(self._gather(w, parts) if split else w for w, split, parts in zip(local, self.split, (2, 1)))

    def stacks(self):
        """Every expert's weights whole: each split stack all-gathered once (one layer's experts, for a prompt)."""
        return tuple(
            self._gather(w, parts) if split else w for w, split, parts in zip(super().stacks(), self.split, (2, 1))
        )

    def _gather(self, shard, parts: int):
        """Each rank's (k, rows, columns) shard all-gathered: the last axis is `parts` halves (gate, up) of which
        each rank holds a slice, put back as rank 0's slice, rank 1's, ... within each part."""
        return gathered_columns(self.all_gather(shard), self.world_size, parts)


def gathered_columns(gathered, world_size: int, parts: int):
    """An all-gather of (k, rows, parts x columns) shards, (world x k, rows, parts x columns), put back together
    as (k, rows, parts x world x columns): every rank's columns of each part side by side, rank by rank."""
    total, rows, width = gathered.shape
    k, columns = total // world_size, width // parts
    split = gathered.reshape(world_size, k, rows, parts, columns)
    # ops.transpose rather than Tensor.permute: the decode graphs call this inside `mindspore.jit` too
    return ops.transpose(split, (1, 2, 3, 0, 4)).reshape(k, rows, parts * world_size * columns)


def split_by_zero3(cell) -> bool:
    """Whether mindone's ZeRO-3 split this cell's weight (its wrapper gathers it on use)."""
    wrapper = getattr(cell, "param_wrapper_w", None)
    return bool(getattr(wrapper, "need_rewrite", False))


def dispatch_on_device(experts: StackedExperts, hidden_states, weights, selected):
    """Every (token, chosen expert) slot run from device indices, and combined per token in
    ascending expert order, as mindone adds them. Slots routed to another rank's experts
    (expert parallelism) count zero."""
    tokens, k = selected.shape
    ascending, order = mint.sort(selected, dim=1)
    slot_weights = mint.gather(weights, 1, order)
    mine = ascending < len(experts)
    index = mint.where(mine, ascending, mint.zeros_like(ascending)).reshape(-1)
    rows = hidden_states.unsqueeze(1).broadcast_to((tokens, k, hidden_states.shape[-1])).reshape(tokens * k, -1)
    outputs = experts.slots(rows, index) * (slot_weights * mine.astype(slot_weights.dtype)).reshape(-1, 1)
    outputs = outputs.reshape(tokens, k, -1)
    combined = outputs[:, 0]
    for i in range(1, k):
        combined = combined + outputs[:, i]
    return combined


def dispatch_grouped(experts: StackedExperts, hidden_states, weights, selected, routed: int = 0):
    """Every chosen expert once on its tokens, with no host read, in Ascend's MoE kernels as vllm-mindspore
    runs them: the (token, expert) slots sorted by expert, each slot's token row copied, and where each expert's
    slots end counted (`moe_init_routing_v2`); the gate-and-up product grouped over the stacked experts, SwiGLU,
    the down product grouped (`grouped_matmul_v4`, groups given by where they end); the slots weighted by their
    routing weights and added into their tokens (`moe_token_unpermute`, in top-k order).

    `routed`: the router's expert count when `experts` are one rank's share (expert parallelism), whose
    router numbers them first. Other ranks' slots then sort after this rank's, past every group, where the
    grouped products leave their rows unspecified (on the device, whatever the memory held, NaN included):
    those rows are set to zero, by position, before they are weighted."""
    count = len(experts)
    # dropless (no active count, no capacity, no padding); flag 1: where each expert's slots end
    permuted, sorted_indices, ends = ops.moe_init_routing_v2(
        hidden_states, selected, 0, 0, max(routed, count), 0, 1, False
    )
    ends = ends[:count].astype(ms.int64)
    gate_up, down = experts.stacks()
    out = grouped_product(ops.swiglu(grouped_product(permuted, gate_up, ends), -1), down, ends)
    if routed > count:
        elsewhere = slot_positions(out.shape[0]) >= ends[count - 1 :]  # the slots past this rank's last group
        out = out.masked_fill(elsewhere.reshape(-1, 1), 0.0)
    return ops.moe_token_unpermute(out, sorted_indices, weights)


def grouped_product(x, stack, ends):
    """x's rows in consecutive groups, group e ending before row ends[e], times stack[e] (experts, in, out)."""
    (out,) = generated_ops.grouped_matmul_v4(
        [x], [stack], group_list=ends, split_item=3, group_type=0, group_list_type=0
    )
    return out


@functools.lru_cache(maxsize=64)
def slot_positions(slots: int):
    """0, 1, .. slots - 1 (int64) on the device, made once per prompt length."""
    return ms.Tensor(np.arange(slots, dtype=np.int64))


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


def grouped_applies(experts, hidden_states) -> bool:
    """Whether a prompt's experts run grouped (`dispatch_grouped`) rather than in the loop: stacked, of a dtype
    the grouped matmul takes, and gated by SiLU (what SwiGLU computes)."""
    return (
        PROMPT_DISPATCH == "grouped"
        and isinstance(experts, StackedExperts)
        and hidden_states.dtype in GROUPED_DTYPES
        and type(experts.act_fn).__name__ in SILU
    )


def sparse_moe_forward(block, hidden_states, all_reduce=None):
    """A sparse MoE block's forward (the thinker's, or the talker's with its shared expert).
    Under expert parallelism `block.experts` are this rank's share, which its router numbers
    first, and `all_reduce` adds up the ranks' partial outputs before the replicated shared
    expert is added, once."""
    batch, length, hidden = hidden_states.shape
    flat = hidden_states.view(-1, hidden)
    decoding = length == 1 and flat.shape[0] * block.top_k <= DEVICE_DISPATCH_MAX_SLOTS  # one new token per row
    if isinstance(block.experts, StackedExperts) and decoding:
        router_logits, weights, selected = route(block, flat)
        routed = dispatch_on_device(block.experts, flat, weights, selected)
    elif grouped_applies(block.experts, flat):
        router_logits, weights, selected = route_grouped(block, flat)
        routed = dispatch_grouped(block.experts, flat, weights, selected, router_logits.shape[-1])
    else:
        router_logits, weights, selected = route(block, flat)
        routed = dispatch_experts(block.experts, flat, weights, selected)
    if all_reduce is not None:
        routed = all_reduce(routed)
    shared_expert = getattr(block, "shared_expert", None)  # the talker's; the thinker has none
    if shared_expert is not None:
        routed = routed + mint.nn.functional.sigmoid(block.shared_expert_gate(flat)) * shared_expert(flat)
    return routed.reshape(batch, length, hidden), router_logits
