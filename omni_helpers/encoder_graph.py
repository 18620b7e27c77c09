"""The vision encoder's transformer (its blocks, DeepStack mergers and patch merger) as one
compiled graph (a faster path, every device).

Why: an image's patches go through every block in PyNative, a launch from Python per
operation (norms, projections, rope, attention, MLP), about 35 per block plus the mergers';
for the tiny image + audio request on this CPU that launch cost is most of the vision
encoder's time. Compiled with `mindspore.jit`, the stack is one call.

The patch embedding, the interpolated position embeddings and the rotary frequencies stay in
PyNative (`fast_paths.vision_position_embeddings`, `vision_rotary_embeddings`). A graph needs
static shapes: the patches are padded to a power-of-two bucket (at least `BUCKET_MIN`), the
padding sees nothing and is seen by nothing, and whole merge windows of it are cut from the
outputs. Each image or video frame attends within itself, as mindone's `cu_seqlens` say, by an
additive block mask built on the host.

The graph computes what mindone's blocks compute, in the same order and dtypes: layer norms,
rope in float32, softmax attention in float32 (mindone's eager path; flash attention agrees to
float rounding), the MLP's activation by its definition (erf, or tanh as configured), the
mergers' norms before or after the 2 x 2 shuffle as each is configured
(tests/test_encoder_graph.py). Covered: any device, `--parallel none` and `expert` (the encoder
is whole on every rank); ZeRO-3's split weights keep PyNative. It has compiled on CPU only: a
failure at its first call sends the encoder back to PyNative, with one warning (`compiled`).
"""

from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import ops

from . import compiled
from .graph_ops import MASKED, attention, gelu, layer_norm, linear_with_bias, rotate
from .mindone_fixes import within_blocks

BUCKET_MIN = 64  # the fewest padded patches: below it a new graph per patch count would cost more than the padding
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # the vision MLP's configured activation, as `gelu` takes it
VISION_ENCODER = "Qwen3OmniMoeVisionEncoder"


def vision_applies(vision) -> bool:
    """Whether this vision encoder's forward can run as a compiled graph."""
    if type(vision).__name__ != VISION_ENCODER or ms.get_context("mode") != ms.PYNATIVE_MODE:
        return False
    if compiled.failed(vision, "vision_graph") or vision.config.hidden_act not in ACTIVATIONS:
        return False
    return not any(split_by_zero3(cell) for _, cell in vision.cells_and_names())


def split_by_zero3(cell) -> bool:
    """Whether mindone's ZeRO-3 split this cell's weight (its wrapper gathers it on use)."""
    wrapper = getattr(cell, "param_wrapper_w", None)
    return bool(getattr(wrapper, "need_rewrite", False))


def bucket_for(patches: int) -> int:
    return max(BUCKET_MIN, 1 << (patches - 1).bit_length())


def vision_forward(vision, pixel_values, grid_thw):
    """(merged image features, DeepStack features) as mindone's vision encoder returns them; None when
    the graph fails at its first call (the encoder then stays in PyNative)."""
    hidden = vision.patch_embed(pixel_values)
    hidden = hidden + vision.fast_pos_embed_interpolate(grid_thw)
    rotary = vision.rot_pos_emb(grid_thw)  # (patches, head dim / 2)
    patches, bucket = hidden.shape[0], bucket_for(hidden.shape[0])
    graph = compiled.kept(vision, "vision_graph", (bucket,), lambda: VisionGraph(vision, bucket))
    mask = ms.Tensor(frame_mask(grid_thw.asnumpy(), bucket))
    outputs = compiled.first_call(graph, vision, "vision_graph", lambda: graph.step(pad_rows(hidden, bucket),
                                  pad_rows(rotary, bucket), mask), "vision encoder", "running it step by step instead")  # fmt: skip
    if outputs is None:
        return None
    merged_rows = patches // vision.spatial_merge_size**2
    merged, *deepstack = (features[:merged_rows] for features in outputs)
    return merged, deepstack


def frame_mask(grid_thw: np.ndarray, bucket: int) -> np.ndarray:
    """(bucket, bucket) additive mask: each frame's patches see each other; padding sees and is seen by nothing."""
    frame_patches = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    boundaries = np.concatenate([[0], np.cumsum(frame_patches)])
    keep = np.zeros((bucket, bucket), bool)
    patches = int(boundaries[-1])
    keep[:patches, :patches] = within_blocks(boundaries)[0, 0]
    return np.where(keep, 0.0, MASKED).astype(np.float32)


def pad_rows(tensor, bucket: int):
    """`tensor` (rows, ...) padded with zero rows to `bucket` rows."""
    if tensor.shape[0] == bucket:
        return tensor
    return ops.concat([tensor, ops.zeros((bucket - tensor.shape[0], *tensor.shape[1:]), tensor.dtype)], 0)


class VisionGraph:
    """The vision encoder's blocks and mergers compiled for `bucket` patches:
    (patch states, rotary frequencies, frame mask) -> (merged features, DeepStack features...)."""

    def __init__(self, vision, bucket: int):
        self.step, self.compiled = ms.jit(vision_step(vision, bucket)), False


def vision_step(vision, bucket: int):
    config = vision.config
    heads = config.num_heads
    head_dim = config.hidden_size // heads
    scaling, activation = head_dim**-0.5, ACTIVATIONS[config.hidden_act]
    dtype = vision.patch_embed.proj.weight.dtype
    blocks = [block_weights(block) for block in vision.blocks]
    deepstack = {layer: merger_weights(vision.deepstack_merger_list[i]) for i, layer in enumerate(vision.deepstack_visual_indexes)}
    final_merger = merger_weights(vision.merger)

    def block(x, cos, sin, mask, weights):
        h = layer_norm(x, *weights["norm1"], 1e-6)
        qkv = linear_with_bias(h, *weights["qkv"]).reshape(bucket, 3, heads, head_dim)
        query, key, value = (qkv[:, i] for i in range(3))  # (patches, heads, head dim)
        query = ops.cast(rotate(ops.cast(query, ms.float32), cos, sin), dtype)  # rope in float32, as mindone's
        key = ops.cast(rotate(ops.cast(key, ms.float32), cos, sin), dtype)
        query, key, value = (ops.transpose(t, (1, 0, 2)) for t in (query, key, value))  # (heads, patches, head dim)
        out = ops.transpose(attention(query, key, value, mask, scaling, dtype), (1, 0, 2)).reshape(bucket, -1)
        x = x + linear_with_bias(out, *weights["proj"])
        h = layer_norm(x, *weights["norm2"], 1e-6)
        return x + linear_with_bias(gelu(linear_with_bias(h, *weights["fc1"]), activation), *weights["fc2"])

    def merge(x, weights):
        """A patch merger: each 2 x 2 window's patches concatenated, normed (before or after), then its MLP."""
        width = weights["width"]
        h = x.reshape(-1, width) if weights["postshuffle"] else x
        h = layer_norm(h, *weights["norm"], 1e-6).reshape(-1, width)
        return linear_with_bias(gelu(linear_with_bias(h, *weights["fc1"]), weights["activation"]), *weights["fc2"])

    def step(hidden, rotary, mask):
        emb = ops.concat((rotary, rotary), -1)
        cos = ops.cos(emb).reshape(bucket, 1, head_dim)
        sin = ops.sin(emb).reshape(bucket, 1, head_dim)
        x, features = hidden, ()
        for layer, weights in enumerate(blocks):
            x = block(x, cos, sin, mask, weights)
            if layer in deepstack:
                features += (merge(x, deepstack[layer]),)
        return (merge(x, final_merger),) + features

    return step


def block_weights(block) -> dict:
    """A vision block's parameters, by role (each Linear as (weight, bias))."""
    attention_cell, mlp = block.attn, block.mlp
    return {
        "norm1": (block.norm1.weight, block.norm1.bias), "norm2": (block.norm2.weight, block.norm2.bias),
        "qkv": (attention_cell.qkv.weight, attention_cell.qkv.bias),
        "proj": (attention_cell.proj.weight, attention_cell.proj.bias),
        "fc1": (mlp.linear_fc1.weight, mlp.linear_fc1.bias), "fc2": (mlp.linear_fc2.weight, mlp.linear_fc2.bias),
    }  # fmt: skip


def merger_weights(merger) -> dict:
    first, act, second = merger.mlp
    return {
        "width": merger.hidden_size, "postshuffle": bool(merger.use_postshuffle_norm),
        "norm": (merger.ln_q.weight, merger.ln_q.bias), "activation": getattr(act, "approximate", "none"),
        "fc1": (first.weight, first.bias), "fc2": (second.weight, second.bias),
    }  # fmt: skip
