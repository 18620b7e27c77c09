"""The thinker's prompt through its text layers as one compiled graph, where a static MoE
is cheap (a faster path, every device).

Why: a prompt's forward in PyNative is a launch from Python per operation, about a hundred
per layer, plus the per-expert dispatch's own launches; for short prompts on a small model
that, not arithmetic, is the time to first token. Compiled with `mindspore.jit`, the whole
stack of layers (attention, MoE, norms) is one call.

A graph needs static shapes:
- prompts are padded on the right to a bucket (a power of two, at least
  `compiled.BUCKET_MIN` positions), so prompts of similar lengths share one compiled graph;
  prompts longer than `compiled.BUCKET_MAX` keep PyNative (and flash attention). Padding sits after
  every real token, and attention is causal, so no real position sees it; the outputs are
  cut back to the prompt's length, and the cache gets only the real positions;
- the MoE cannot route tokens to experts in groups whose sizes are only known at run time,
  and without a grouped matmul (none on CPU) a static MoE computes every expert on every
  token, weighted by the router (zero for the experts a token did not choose). That costs
  (experts / top-k) times the routed work, so the graph is used only where that ratio is at
  most `DENSE_EXPERTS_MAX_RATIO`: the tiny checkpoint (4 experts, top 2). The released
  thinker (128 experts, top 8: 16 times) keeps PyNative and its one-read dispatch
  (`sparse_moe.dispatch_experts`) for prompts.

The graph computes what mindone's text model computes in the same order and dtypes: rope
cos and sin from the multimodal positions as mindone's rotary embedding computes them (each
frequency times the time, height or width position its interleaved section gives it; the
default rope type, whose frequencies are fixed), each expert's output is added in ascending
expert order (the unchosen ones add exact zeros), DeepStack's visual features are added after
the first layers as dense tensors that are zero away from visual positions. Attention is
written out (float32 softmax, as mindone's eager path), where PyNative prompts use flash
attention: the two agree to float rounding (tests/mindone_changes/faster/test_prompt_graph.py).

Covered: the thinker's text model with `--parallel none` (experts stacked by
`sparse_moe.stack_experts`), full attention without biases, an empty cache, no attention
weights or router logits asked for. Like the decode graphs it has compiled on CPU only: a
failure at its first call sends the model back to PyNative prompts, with one warning.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import mint, ops

from omni_helpers.mindone_changes.faster import compiled, host_positions
from omni_helpers.mindone_changes.faster.decode_graph import decoder_covered, decoder_layers, layer_weights
from omni_helpers.mindone_changes.faster.graph_ops import (
    MASKED,
    batched_product,
    grouped_query_attention,
    linear,
    rms_norm_with,
    rope,
    rotate,
    route,
    swiglu,
)
from omni_helpers.parallel.sparse_moe import SPARSE_MOE_BLOCKS, StackedExperts

DENSE_EXPERTS_MAX_RATIO = 4  # every expert on every token costs experts / top-k times the routed work
TEXT_MODEL = "Qwen3OmniMoeThinkerTextModel"


def applies(text_model, inputs_embeds, past_key_values, use_cache, kwargs: dict) -> bool:
    """Whether this text-model call is a prompt the graph covers."""
    if type(text_model).__name__ != TEXT_MODEL or ms.get_context("mode") != ms.PYNATIVE_MODE:
        return False
    if compiled.failed(text_model, "prompt_graph") or inputs_embeds is None:
        return False
    if kwargs.get("output_attentions") or kwargs.get("output_router_logits"):
        return False
    if compiled.bucket_for(inputs_embeds.shape[1]) > compiled.BUCKET_MAX:
        return False
    if text_model.rotary_emb.rope_type != "default":  # the others rescale their frequencies per call
        return False
    if past_key_values is None or past_key_values.get_seq_length() != 0 or not use_cache:
        return False  # a prompt starts an empty cache (`get_seq_length` reads nothing while it is empty)
    mlps = [layer.mlp for layer in decoder_layers(text_model)]
    if any(type(mlp).__name__ not in SPARSE_MOE_BLOCKS for mlp in mlps):  # one rank's share of a block: PyNative
        return False
    return decoder_covered(text_model, sparse=True) and all(dense_experts_pay(mlp) for mlp in mlps)


def dense_experts_pay(mlp) -> bool:
    """A local `StackedExperts` (not ZeRO-3's shards) few enough that running all of them is cheap."""
    experts = mlp.experts
    return type(experts) is StackedExperts and len(experts) <= DENSE_EXPERTS_MAX_RATIO * mlp.top_k


def forward(
    text_model,
    inputs_embeds,
    attention_mask,
    position_ids,
    past_key_values,
    visual_pos_masks=None,
    deepstack_visual_embeds=None,
    output_hidden_states=None,
):
    """The text model's outputs for a prompt (mindone's `BaseModelOutputWithPast`), its keys and values
    added to `past_key_values`; None when the graph fails at its first call (the model then stays in PyNative)."""
    from mindone.transformers.modeling_outputs import BaseModelOutputWithPast

    rows, length, _ = inputs_embeds.shape
    bucket = compiled.bucket_for(length)
    deepstack = deepstack_additions(inputs_embeds, visual_pos_masks, deepstack_visual_embeds, bucket)
    key = (rows, bucket, len(deepstack))
    graph = compiled.kept(text_model, "prompt_graph", key, lambda: compiled.Graph(prompt_step(text_model, *key)))
    if (
        position_ids.ndim == 3 and position_ids.shape[0] == 4
    ):  # text positions first, as mindone's text model reads them
        position_ids = position_ids[1:]
    elif position_ids.ndim == 2:
        position_ids = position_ids[None].expand((3, rows, length))
    # padding gets position 0 and is not a real key: what it computes is never seen
    positions = compiled.padded(position_ids.to(ms.float32), bucket, axis=-1)
    real = np.zeros((rows, bucket), np.float32)
    real[:, :length] = 1 if attention_mask is None else host_positions.on_host(attention_mask)
    inputs = (compiled.padded(inputs_embeds, bucket, axis=1), positions, ms.Tensor(real), *deepstack)
    outputs = compiled.first_call(
        graph, text_model, "prompt_graph", lambda: graph.step(*inputs), "prompt", "running prompts step by step instead"
    )
    if outputs is None:
        return None
    hidden, *rest = outputs
    count = len(decoder_layers(text_model))
    hidden_states, keys, values = rest[: count + 1], rest[count + 1 : 2 * count + 1], rest[2 * count + 1 :]
    for layer, (key, value) in enumerate(zip(keys, values)):
        past_key_values.update(key[:, :, :length], value[:, :, :length], layer)
    return BaseModelOutputWithPast(
        last_hidden_state=hidden[:, :length],
        past_key_values=past_key_values,
        hidden_states=tuple(h[:, :length] for h in hidden_states) if output_hidden_states else None,
    )


def deepstack_additions(inputs_embeds, visual_pos_masks, deepstack_visual_embeds, bucket: int) -> list:
    """DeepStack's visual features as dense additions (rows, bucket, hidden), zero away from visual positions
    and on the padding: the k-th visual position takes row k, by one gather from the host's positions."""
    if deepstack_visual_embeds is None:
        return []
    where = host_positions.on_host(visual_pos_masks)
    where = where[..., 0] if where.ndim == 3 else where
    rows, length = where.shape
    index = np.zeros((rows, bucket), np.int64)  # row 0 of the sources is zeros
    index[:, :length][where] = 1 + np.arange(int(where.sum()))
    index = ms.Tensor(index.reshape(-1))
    zero = mint.zeros((1, inputs_embeds.shape[-1]), dtype=inputs_embeds.dtype)
    return [
        ops.gather(mint.cat([zero, embeds.to(inputs_embeds.dtype)]), index, 0).reshape(rows, bucket, -1)
        for embeds in deepstack_visual_embeds
    ]


def mrope_axes(section, frequencies: int) -> np.ndarray:
    """(3, frequencies) one-hot float32: which position axis (time, height, width) each rotary frequency
    reads in mindone's interleaved layout (`apply_interleaved_mrope`)."""
    axis = np.zeros(frequencies, np.int64)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset : section[dim] * 3 : 3] = dim
    return (np.arange(3)[:, None] == axis[None]).astype(np.float32)


def prompt_step(text_model, rows: int, bucket: int, deepstack_layers: int):
    """(embeddings, rope positions, real positions, DeepStack additions...) -> (final-normed hidden, hidden states as
    mindone records them, keys..., values...) for a prompt of (rows, bucket) positions."""
    layers = [layer_weights(layer) for layer in decoder_layers(text_model)]
    config = text_model.config
    attention0 = decoder_layers(text_model)[0].self_attn
    dtype, head_dim = attention0.q_proj.weight.dtype, attention0.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    eps, scaling = config.rms_norm_eps, head_dim**-0.5
    final_norm = text_model.norm.weight
    causal = ms.Tensor(np.tril(np.ones((bucket, bucket), np.float32)).reshape(1, 1, 1, bucket, bucket))
    rotary = text_model.rotary_emb
    axes = ms.Tensor(mrope_axes(rotary.mrope_section, rotary.inv_freq.shape[-1]).reshape(3, 1, 1, -1))

    def norm(x, weight):
        return rms_norm_with(x, weight, eps, dtype)

    def attention(x, cos, sin, mask, weights):
        query = linear(x, weights["q"]).reshape(rows, bucket, heads, head_dim)
        key = linear(x, weights["k"]).reshape(rows, bucket, kv_heads, head_dim)
        value = linear(x, weights["v"]).reshape(rows, bucket, kv_heads, head_dim)
        query = rotate(norm(query, weights["q_norm"]), cos, sin)
        key = rotate(norm(key, weights["k_norm"]), cos, sin)
        key, value = (
            ops.transpose(key, (0, 2, 1, 3)),
            ops.transpose(value, (0, 2, 1, 3)),
        )  # (rows, kv heads, bucket, dim)
        out = linear(grouped_query_attention(query, key, value, mask, scaling, dtype), weights["o"])
        return out, key, value

    def every_expert(x, weights):
        """Each token through every expert, weighted by its renormalised top-k weights (zero elsewhere)."""
        chosen_weights, chosen = route(x, weights["router"], weights["top_k"], weights["normalize"], dtype)
        experts = weights["experts_gate_up"].shape[0]
        # (tokens, experts): each token's weight for every expert, zero for those it did not choose
        chosen_onehot = ops.one_hot(chosen, experts, ops.ones((), dtype), ops.zeros((), dtype))  # (tokens, k, experts)
        per_expert = ops.ReduceSum()(chosen_onehot * chosen_weights.reshape(-1, weights["top_k"], 1), 1)
        # every expert on every token: (experts, tokens, hidden)
        inner_states = swiglu(batched_product(x.reshape(1, *x.shape), weights["experts_gate_up"]))
        out = batched_product(inner_states, weights["experts_down"])
        out = out * ops.transpose(per_expert, (1, 0)).reshape(experts, -1, 1)
        # the unchosen experts add exact zeros; at top-2 any order of the sum gives mindone's bits
        combined = ops.ReduceSum()(out, 0)
        return combined

    def step(embeds, positions, real, *deepstack):
        cos, sin = rope(positions, rotary.inv_freq, rotary.attention_scaling, dtype, axes)
        visible = causal * real.reshape(rows, 1, 1, 1, bucket)  # a key is visible when real and not later
        mask = ops.select(visible > 0, ops.zeros_like(visible), ops.fill(ms.float32, visible.shape, MASKED))
        x = embeds.reshape(rows * bucket, -1)
        hidden_states, keys, values = (), (), ()
        for index, weights in enumerate(layers):
            hidden_states += (x.reshape(rows, bucket, -1),)
            attended, key, value = attention(norm(x, weights["input_norm"]), cos, sin, mask, weights)
            x = x + attended
            x = x + every_expert(norm(x, weights["post_norm"]), weights)
            if index < deepstack_layers:
                x = x + deepstack[index].reshape(rows * bucket, -1)
            keys, values = keys + (key,), values + (value,)
        x = norm(x, final_norm).reshape(rows, bucket, -1)
        return (x,) + hidden_states + (x,) + keys + values

    return step
