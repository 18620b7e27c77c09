"""Operations the compiled graphs (`decode_graph`, `prompt_graph`, `encoder_graph`) are written
in: legacy `ops` primitives, which have CPU kernels, in the order and dtypes of mindone's
layers (and of the CPU fallbacks' formulas, where mindone calls a `mint` function that has
no CPU kernel), so a graph gives what the PyNative path gives, on every device.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import mint, ops

MASKED = float(np.finfo(np.float32).min)  # an additive mask's "not visible", as mindone's masks use it

_MATMUL_BT = ops.MatMul(transpose_b=True)  # x @ weight.T without a transposed copy of the weight
_BATCH_MATMUL_BT = ops.BatchMatMul(transpose_b=True)
_BATCH_MATMUL = ops.BatchMatMul()


def linear(x, weight):
    return _MATMUL_BT(x, weight)


def batched_linear(x, weights):
    """x (batch, rows, in) through a weight (batch, out, in) each: (batch, rows, out)."""
    return _BATCH_MATMUL_BT(x, weights)


def batched_product(x, weights):
    """x (batch, rows, in) times a weight (batch, in, out) each, as the stacked experts lay theirs out:
    (batch, rows, out); x's batch may be 1, broadcast over the weights'."""
    if x.shape[0] != weights.shape[0]:
        x = ops.broadcast_to(x, (weights.shape[0], *x.shape[1:]))
    return _BATCH_MATMUL(x, weights)


def swiglu(gate_up):
    """SiLU of the last axis' first half times its second half (the stacked experts' gate and up)."""
    gate, up = ops.split(gate_up, gate_up.shape[-1] // 2, -1)
    return mint.nn.functional.silu(gate) * up


def dense(x, gate, up, down):
    """A gated MLP (SiLU), from its three Linear weights."""
    return linear(mint.nn.functional.silu(linear(x, gate)) * linear(x, up), down)


def route(x, router, top_k: int, normalize: bool, dtype):
    """A MoE layer's routing as mindone's: (top-k weights in `dtype`, renormalised if configured; chosen experts)."""
    routing = ops.softmax(ops.cast(linear(x, router), ms.float32), -1)
    chosen_weights, chosen = ops.topk(routing, top_k)
    if normalize:
        chosen_weights = chosen_weights / ops.ReduceSum(keep_dims=True)(chosen_weights, -1)
    return ops.cast(chosen_weights, dtype), chosen


def rms_norm_with(x, weight, eps: float, dtype):
    """mindone's RMS norm: the statistics in float32, the result in `dtype`."""
    x = ops.cast(x, ms.float32)
    variance = ops.mean(ops.square(x), -1, keep_dims=True)  # x * x: pow(x, 2)'s value, and Pow is a slow CPU kernel
    return weight * ops.cast(x * ops.rsqrt(variance + eps), dtype)


def rotate(x, cos, sin):
    """Rope applied to x (..., head dim): x * cos + rotate_half(x) * sin."""
    first, second = ops.split(x, x.shape[-1] // 2, -1)
    return x * cos + ops.concat((-second, first), -1) * sin


def linear_with_bias(x, weight, bias):
    return linear(x, weight) + bias


def layer_norm(x, weight, bias, eps: float):
    """mint's layer norm over the last axis (the `ops.LayerNorm` kernel the CPU fallback runs too)."""
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)(x, weight, bias)[0]


def gelu(x, approximate: str = "none"):
    """GELU by its definition (erf), or its tanh approximation: the CPU fallback's formulas."""
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + ops.tanh(inner))
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


def attention(query, key, value, mask, scaling: float, dtype):
    """Softmax attention in float32 over (..., queries, dim) x (..., keys, dim), an additive mask added: every
    compiled graph's attention (the encoders call it directly, the decoders through `grouped_query_attention`)."""
    scores = ops.cast(batched_linear(query, key) * scaling, ms.float32) + mask
    return ops.matmul(ops.cast(ops.softmax(scores, -1), dtype), value)


def grouped_query_attention(query, keys, values, mask, scaling: float, dtype):
    """A decoder's attention: queries (rows, new tokens, heads, dim) over keys and values (rows, kv heads, keys,
    dim), the heads that share a kv head adjacent, `mask` broadcastable to (rows, kv heads, groups, new tokens,
    keys) -> (rows * new tokens, heads * dim), ready for the output projection."""
    rows, tokens, heads, dim = query.shape
    kv_heads, key_count = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    query = ops.transpose(query, (0, 2, 1, 3)).reshape(rows, kv_heads, groups * tokens, dim)
    mask = ops.broadcast_to(mask, (rows, kv_heads, groups, tokens, key_count)).reshape(rows, kv_heads, -1, key_count)
    out = attention(query, keys, values, mask, scaling, dtype).reshape(rows, heads, tokens, dim)
    return ops.transpose(out, (0, 2, 1, 3)).reshape(rows * tokens, heads * dim)


def rope(positions, inverse_frequencies, scaling: float, dtype, axes=None):
    """cos and sin (rows, tokens, 1, head dim) as mindone's rotary embeddings compute them, for `rotate`.
    positions: (rows, tokens) float; or (3, rows, tokens) with `axes` (3, 1, 1, head dim / 2), one-hot: the
    multimodal rope, each frequency taking the time, height or width position its interleaved section gives
    it (the other two add exact zeros)."""
    inverse_frequencies = ops.cast(inverse_frequencies, ms.float32).reshape(1, 1, 1, -1)
    if axes is None:
        rows, tokens = positions.shape
        freqs = positions.reshape(rows, tokens, 1, 1) * inverse_frequencies
    else:
        _, rows, tokens = positions.shape
        freqs = ops.ReduceSum()(positions.reshape(3, rows, tokens, 1) * inverse_frequencies * axes, 0)
        freqs = freqs.reshape(rows, tokens, 1, -1)
    angles = ops.concat((freqs, freqs), -1)
    return ops.cast(ops.cos(angles) * scaling, dtype), ops.cast(ops.sin(angles) * scaling, dtype)


def convolution(x, conv):
    """A `mint.nn.Conv2d` or `Conv3d` cell's convolution (zero padding), with its bias."""
    spatial, kernel = conv.weight.ndim - 2, tuple(conv.weight.shape[2:])
    primitive = {2: ops.Conv2D, 3: ops.Conv3D}[spatial]
    pad = ()
    for side in conv.padding:  # the same before and after, per axis (a loop: graphs parse one comprehension only)
        pad += (side, side)
    out = primitive(
        conv.weight.shape[0],
        kernel,
        pad_mode="pad",
        pad=pad,
        stride=conv.stride,
        dilation=conv.dilation,
        group=conv.groups,
    )(x, conv.weight)
    return out if conv.bias is None else out + conv.bias.reshape((1, -1) + (1,) * spatial)
