"""The vision encoder's and the audio encoder's transformers as one compiled graph each (a
faster path, every device).

Why: an image's patches, or an audio's frames, go through every block in PyNative, a launch
from Python per operation (norms, projections, rope, attention, MLP), about 35 per block plus
the mergers' or the convolutions'; for the tiny image + audio request on this CPU that launch
cost is most of the encoders' time. Compiled with `mindspore.jit`, each stack is one call.

- Vision: the blocks, DeepStack mergers and patch merger. The patch embedding, the
  interpolated position embeddings and the rotary frequencies stay in PyNative
  (`fast_paths.vision_position_embeddings`, `vision_rotary_embeddings`). Each image or video
  frame attends within itself, as mindone's `cu_seqlens` say, by an additive block mask
  built on the host.
- Audio: from the chunked mel frames (cut in PyNative, `mindone_fixes.audio_chunks`) through
  the three convolutions, the positions, the layers (each token within its attention window,
  `mindone_fixes.audio_windows`) and the output projection.

A graph needs static shapes: patches, audio chunks and audio tokens are padded to power-of-two
buckets (`compiled.bucket_for`); padding sees nothing and is seen by nothing, and is cut from
the outputs (whole merge windows of patches; the tokens of padded chunks are never gathered).
More than `compiled.BUCKET_MAX` patches or tokens keep PyNative (and its flash attention).

The graphs compute what mindone's layers compute, in the same order and dtypes: layer norms,
rope in float32, softmax attention in float32 (mindone's eager path; flash attention agrees to
float rounding), activations by their definition (erf, or tanh as configured), the mergers'
norms before or after the 2 x 2 shuffle as each is configured (tests/mindone_changes/faster/test_encoder_graph.py).
Covered: any device, `--parallel none` and `expert` (the encoders are whole on every rank);
ZeRO-3's split weights keep PyNative. They have compiled on CPU only: a failure at the first
call sends that encoder back to PyNative, with one warning (`compiled`).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops

from omni_helpers.mindone_changes.faster import compiled, host_positions
from omni_helpers.mindone_changes.faster.graph_ops import (
    MASKED,
    attention,
    convolution,
    gelu,
    layer_norm,
    linear,
    linear_with_bias,
    rotate,
)
from omni_helpers.mindone_changes.mindone_fixes import (
    audio_chunks,
    audio_windows,
    conv_output_lengths,
    real_token_rows,
    split_into_chunks,
    within_blocks,
)
from omni_helpers.parallel.sparse_moe import split_by_zero3

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # configured activations, as `gelu` takes them
VISION_ENCODER = "Qwen3OmniMoeVisionEncoder"
AUDIO_ENCODER = "Qwen3OmniMoeAudioEncoder"


def vision_applies(vision) -> bool:
    """Whether this vision encoder's forward can run as a compiled graph."""
    return encoder_applies(vision, VISION_ENCODER, "vision_graph", vision.config.hidden_act)


def audio_applies(audio) -> bool:
    """Whether this audio encoder's forward can run as a compiled graph."""
    return encoder_applies(audio, AUDIO_ENCODER, "audio_graph", audio.config.activation_function)


def encoder_applies(encoder, kind_name: str, graph_kind: str, activation: str) -> bool:
    if type(encoder).__name__ != kind_name or ms.get_context("mode") != ms.PYNATIVE_MODE:
        return False
    if compiled.failed(encoder, graph_kind) or activation not in ACTIVATIONS:
        return False
    return not any(split_by_zero3(cell) for _, cell in encoder.cells_and_names())


def vision_forward(vision, pixel_values, grid_thw):
    """(merged image features, DeepStack features) as mindone's vision encoder returns them; None when
    the graph fails at its first call (the encoder then stays in PyNative)."""
    grid = host_positions.on_host(grid_thw)
    patches = int(np.prod(grid, axis=1).sum())
    bucket = compiled.bucket_for(patches)
    if bucket > compiled.BUCKET_MAX:  # attention over every pair of patches: PyNative's flash attention instead
        return None
    merge = vision.spatial_merge_size
    # each patch's four neighbours in the learned position table and their weights, and its (row, column)
    corners, weights = host_positions.interpolated_patch_positions(grid, vision.num_grid_per_side, merge)
    coordinates = host_positions.patch_coordinates(grid, merge)
    positions = [ms.Tensor(np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, bucket - patches)])) for a in (corners, weights)]
    coordinates = ms.Tensor(np.pad(coordinates, [(0, bucket - patches), (0, 0)]))
    graph = compiled.kept(vision, "vision_graph", (bucket,), lambda: compiled.Graph(vision_step(vision, bucket)))
    mask = ms.Tensor(block_mask(frame_boundaries(grid), bucket))
    outputs = compiled.first_call(
        graph,
        vision,
        "vision_graph",
        lambda: graph.step(compiled.padded(pixel_values, bucket), *positions, coordinates, mask),
        "vision encoder",
        "running it step by step instead",
    )
    if outputs is None:
        return None
    merged_rows = patches // merge**2
    merged, *deepstack = (features[:merged_rows] for features in outputs)
    return merged, deepstack


def frame_boundaries(grid_thw: np.ndarray) -> np.ndarray:
    """Where each image or video frame's patches start, and the end: mindone's vision `cu_seqlens`."""
    frame_patches = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.concatenate([[0], np.cumsum(frame_patches)])


def block_mask(boundaries: np.ndarray, bucket: int) -> np.ndarray:
    """(bucket, bucket) additive mask: rows between consecutive boundaries see each other; padding sees
    and is seen by nothing."""
    keep = np.zeros((bucket, bucket), bool)
    rows = int(boundaries[-1])
    keep[:rows, :rows] = within_blocks(boundaries)[0, 0]
    return np.where(keep, 0.0, MASKED).astype(np.float32)


def vision_step(vision, bucket: int):
    """(pixels, position-table corners and weights, patch coordinates, frame mask) -> (merged features,
    DeepStack features...) for `bucket` patches."""
    config = vision.config
    heads = config.num_heads
    head_dim = config.hidden_size // heads
    scaling, activation = head_dim**-0.5, ACTIVATIONS[config.hidden_act]
    dtype = vision.patch_embed.proj.weight.dtype
    blocks = [block_weights(block) for block in vision.blocks]
    deepstack = {
        layer: merger_weights(vision.deepstack_merger_list[i])
        for i, layer in enumerate(vision.deepstack_visual_indexes)
    }
    final_merger = merger_weights(vision.merger)

    def block(x, cos, sin, mask, weights):
        h = layer_norm(x, *weights["norm1"])
        qkv = linear_with_bias(h, *weights["qkv"]).reshape(bucket, 3, heads, head_dim)
        query, key, value = (qkv[:, i] for i in range(3))  # (patches, heads, head dim)
        query = ops.cast(rotate(ops.cast(query, ms.float32), cos, sin), dtype)  # rope in float32, as mindone's
        key = ops.cast(rotate(ops.cast(key, ms.float32), cos, sin), dtype)
        query, key, value = (ops.transpose(t, (1, 0, 2)) for t in (query, key, value))  # (heads, patches, head dim)
        out = ops.transpose(attention(query, key, value, mask, scaling, dtype), (1, 0, 2)).reshape(bucket, -1)
        x = x + linear_with_bias(out, *weights["proj"])
        h = layer_norm(x, *weights["norm2"])
        return x + linear_with_bias(gelu(linear_with_bias(h, *weights["fc1"]), activation), *weights["fc2"])

    def merge(x, weights):
        """A patch merger: each 2 x 2 window's patches concatenated, normed (before or after), then its MLP."""
        width = weights["width"]
        h = x.reshape(-1, width) if weights["postshuffle"] else x
        h = layer_norm(h, *weights["norm"]).reshape(-1, width)
        return linear_with_bias(gelu(linear_with_bias(h, *weights["fc1"]), weights["activation"]), *weights["fc2"])

    patch_embed, table = vision.patch_embed, vision.pos_embed.weight
    pixels_shape = (
        bucket,
        patch_embed.in_channels,
        patch_embed.temporal_patch_size,
        patch_embed.patch_size,
        patch_embed.patch_size,
    )
    inverse_frequencies = vision.rotary_pos_emb.inv_freq.reshape(1, 1, -1)

    def embed(pixels, corners, weights):
        """mindone's patch embedding plus its interpolated position embedding (the four corners summed in order)."""
        x = convolution(ops.cast(pixels, dtype).reshape(pixels_shape), patch_embed.proj).reshape(bucket, -1)
        corner_embeds = ops.gather(table, corners.reshape(-1), 0).reshape(4, bucket, -1)
        corner_embeds = corner_embeds * ops.cast(weights, table.dtype).reshape(4, bucket, 1)
        return x + (corner_embeds[0] + corner_embeds[1] + corner_embeds[2] + corner_embeds[3])

    def step(pixels, corners, weights, coordinates, mask):
        hidden = embed(pixels, corners, weights)
        # each patch's (row, column) times the frequencies: mindone's table rows, product for product
        rotary = (ops.cast(coordinates, ms.float32).reshape(bucket, 2, 1) * inverse_frequencies).reshape(bucket, -1)
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
        "norm1": norm_weights(block.norm1),
        "norm2": norm_weights(block.norm2),
        "qkv": (attention_cell.qkv.weight, attention_cell.qkv.bias),
        "proj": (attention_cell.proj.weight, attention_cell.proj.bias),
        "fc1": (mlp.linear_fc1.weight, mlp.linear_fc1.bias),
        "fc2": (mlp.linear_fc2.weight, mlp.linear_fc2.bias),
    }


def merger_weights(merger) -> dict:
    first, act, second = merger.mlp
    return {
        "width": merger.hidden_size,
        "postshuffle": bool(merger.use_postshuffle_norm),
        "norm": norm_weights(merger.ln_q),
        "activation": getattr(act, "approximate", "none"),
        "fc1": (first.weight, first.bias),
        "fc2": (second.weight, second.bias),
    }


def norm_weights(norm) -> tuple:
    return norm.weight, norm.bias, norm.eps


# ----------------------------------------------------------------------------- audio


def audio_forward(audio, input_features, feature_lens):
    """The audio encoder's outputs (mindone's `BaseModelOutput`) for (mel, frames) features of audios of
    `feature_lens` frames; None when the graph fails at its first call (the encoder then stays in PyNative)."""
    from mindone.transformers.modeling_outputs import BaseModelOutput

    lengths = host_positions.on_host(feature_lens).astype(np.int64)
    chunk_lengths = split_into_chunks(lengths, audio.n_window * 2)
    longest = max(chunk_lengths)  # every chunk is padded to it
    tokens_per_chunk = int(conv_output_lengths(np.array([longest]))[0])
    rows = real_token_rows(chunk_lengths, tokens_per_chunk)
    chunk_bucket, token_bucket = compiled.bucket_for(len(chunk_lengths), 1), compiled.bucket_for(len(rows))
    if token_bucket > compiled.BUCKET_MAX:  # attention over every pair of tokens: PyNative's flash attention instead
        return None
    chunks = audio_chunks(input_features, chunk_lengths)  # (chunks, 1, mel, longest)
    key = (chunk_bucket, longest, token_bucket)
    graph = compiled.kept(audio, "audio_graph", key, lambda: compiled.Graph(audio_step(audio, token_bucket)))
    mask = ms.Tensor(block_mask(audio_windows(audio, lengths, tokens_per_chunk), token_bucket))
    gather = ms.Tensor(np.pad(rows, (0, token_bucket - len(rows))))  # padding gathers row 0: it is masked out
    outputs = compiled.first_call(
        graph,
        audio,
        "audio_graph",
        lambda: graph.step(compiled.padded(chunks, chunk_bucket), gather, mask),
        "audio encoder",
        "running it step by step instead",
    )
    return None if outputs is None else BaseModelOutput(last_hidden_state=outputs[: len(rows)])


def audio_step(audio, tokens: int):
    """(chunks, real token rows, window mask) -> the encoder's output states, for `tokens` tokens."""
    config = audio.config
    heads = config.encoder_attention_heads
    head_dim = config.d_model // heads
    scaling, activation = head_dim**-0.5, ACTIVATIONS[config.activation_function]
    dtype = audio.conv_out.weight.dtype
    convs = [audio.conv2d1, audio.conv2d2, audio.conv2d3]
    positions = audio.positional_embedding.positional_embedding
    layers = [audio_layer_weights(layer) for layer in audio.layers]
    post_norm = norm_weights(audio.ln_post)

    def layer(x, mask, weights):
        h = layer_norm(x, *weights["attention_norm"])
        query, key, value = (
            ops.transpose(linear_with_bias(h, *weights[name]).reshape(tokens, heads, head_dim), (1, 0, 2))
            for name in ("q", "k", "v")
        )  # (heads, tokens, head dim)
        out = ops.transpose(attention(query, key, value, mask, scaling, dtype), (1, 0, 2)).reshape(tokens, -1)
        x = x + linear_with_bias(out, *weights["out"])
        h = layer_norm(x, *weights["final_norm"])
        x = x + linear_with_bias(gelu(linear_with_bias(h, *weights["fc1"]), activation), *weights["fc2"])
        if dtype == ms.float16:  # as mindone's layer keeps float16 finite
            limit = float(np.finfo(np.float16).max) - 1000
            x = ops.clip_by_value(x, -limit, limit)
        return x

    def step(chunks, rows, mask):
        x = chunks
        for conv in convs:
            x = gelu(convolution(x, conv))
        count, channels, frequencies, time = x.shape
        x = linear(ops.transpose(x, (0, 3, 1, 2)).reshape(count * time, channels * frequencies), audio.conv_out.weight)
        x = x.reshape(count, time, -1) + ops.cast(positions[:time], dtype).reshape(1, time, -1)
        x = ops.gather(x.reshape(count * time, -1), rows, 0)
        for weights in layers:
            x = layer(x, mask, weights)
        x = layer_norm(x, *post_norm)
        return linear_with_bias(
            gelu(linear_with_bias(x, audio.proj1.weight, audio.proj1.bias), activation),
            audio.proj2.weight,
            audio.proj2.bias,
        )

    return step


def audio_layer_weights(layer) -> dict:
    attention_cell = layer.self_attn
    return {
        "attention_norm": norm_weights(layer.self_attn_layer_norm),
        "final_norm": norm_weights(layer.final_layer_norm),
        **{
            name: (getattr(attention_cell, f"{name}_proj").weight, getattr(attention_cell, f"{name}_proj").bias)
            for name in ("q", "k", "v", "out")
        },
        "fc1": (layer.fc1.weight, layer.fc1.bias),
        "fc2": (layer.fc2.weight, layer.fc2.bias),
    }
