"""Operations the compiled graphs (`decode_graph`, `prompt_graph`, `encoder_graph`) are written
in: legacy `ops` primitives, which have CPU kernels, in the order and dtypes of mindone's
layers (and of the CPU fallbacks' formulas, where mindone calls a `mint` function that has
no CPU kernel), so a graph gives what the PyNative path gives, on every device.
"""

from __future__ import annotations

import math

import numpy as np

import mindspore as ms
from mindspore import mint, ops

MASKED = float(np.finfo(np.float32).min)  # an additive mask's "not visible", as mindone's masks use it

_MATMUL_BT = ops.MatMul(transpose_b=True)  # x @ weight.T without a transposed copy of the weight
_BATCH_MATMUL_BT = ops.BatchMatMul(transpose_b=True)


def linear(x, weight):
    return _MATMUL_BT(x, weight)


def batched_linear(x, weights):
    """x (batch, rows, in) through a weight (batch, out, in) each: (batch, rows, out)."""
    return _BATCH_MATMUL_BT(x, weights)


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
    """Softmax attention in float32 over (..., queries, dim) x (..., keys, dim), an additive mask added."""
    scores = ops.cast(batched_linear(query, key) * scaling, ms.float32) + mask
    return ops.matmul(ops.cast(ops.softmax(scores, -1), dtype), value)


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
