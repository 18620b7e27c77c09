"""Faster paths through mindone, installed on every device (`--variant stock` in the benchmark
turns them off). Each gives the same results as the code it replaces; the parity tests run
with them installed and tests/test_fast_paths.py compares them with mindone's own code.

- Attention masks. For eager attention mindone evaluates the mask function once per key
  position in a Python loop (`masking_utils._vmap_patch`), several operations each, on
  every forward: decode cost grows with the context through host work alone. Mask
  functions are elementwise in their four index arguments, so one call with broadcast
  index tensors gives the whole mask in a constant number of operations.
- MoE dispatch. mindone's sparse MoE blocks (thinker and talker) loop over experts with
  two host synchronisations each; `dispatch_experts` reads the routing once.
- On CPU only: each operation runs in the calling thread (`pynative_synchronize`).
  PyNative normally hands every launch to a pipeline of threads and returns at once; on a
  CPU, with operations as small as the ones mindone's generation loop issues, the
  hand-offs cost more than the work (on 2 cores the tiny checkpoint decodes 14.4 tokens/s
  synchronously against 2.7). On Ascend the pipeline is what keeps the NPU busy while
  Python prepares the next launch, so it stays.
"""

from __future__ import annotations

from .patching import PatchSet

FAST_PATHS = PatchSet("fast paths")


def install_fast_paths(device_target: str) -> list[str]:
    """Install every faster path for `device_target`; returns the names of what was replaced."""
    run_synchronously(device_target == "CPU")
    return FAST_PATHS.install()


def uninstall_fast_paths() -> None:
    """Back to stock mindone (the benchmark's baseline; tests that show the paths change nothing)."""
    run_synchronously(False)
    FAST_PATHS.uninstall()


def run_synchronously(enabled: bool) -> None:
    """Run each MindSpore operation to completion in the calling thread (or go back to the asynchronous pipeline)."""
    import mindspore as ms

    ms.set_context(pynative_synchronize=enabled)


@FAST_PATHS.replaces("mindone.transformers.masking_utils:_vmap_patch")
def broadcast_mask(mask_function, batch_arange, head_arange, cache_position, kv_arange, bh_indices: bool = True):
    """The mask `mask_function(b, h, q, kv)` for every index at once, by broadcasting."""
    q_len, kv_len = cache_position.shape[0], kv_arange.shape[0]
    if bh_indices:
        batch, heads = batch_arange.shape[0], head_arange.shape[0]
        mask = mask_function(
            batch_arange.reshape(-1, 1, 1, 1),
            head_arange.reshape(1, -1, 1, 1),
            cache_position.reshape(1, 1, -1, 1),
            kv_arange.reshape(1, 1, 1, -1),
        )
        return mask.broadcast_to((batch, heads, q_len, kv_len))
    mask = mask_function(batch_arange, head_arange, cache_position.reshape(-1, 1), kv_arange.reshape(1, -1))
    return mask.broadcast_to((q_len, kv_len))


# ----------------------------------------------------------------------------- MoE dispatch

MODELING = "mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"


def route(block, hidden_states):
    """Router logits, the top-k weights (renormalised if configured) and the chosen experts, as mindone computes them."""
    import mindspore as ms
    from mindspore import mint

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
    import numpy as np

    import mindspore as ms
    from mindspore import mint

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
    from mindspore import mint

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


@FAST_PATHS.replaces(
    f"{MODELING}.Qwen3OmniMoeThinkerTextSparseMoeBlock:construct",
    f"{MODELING}.Qwen3OmniMoeTalkerTextSparseMoeBlock:construct",
)
def sparse_moe_construct(self, hidden_states):
    return sparse_moe_forward(self, hidden_states)
