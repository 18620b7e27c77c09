"""The thinker's prompt forward with its bookkeeping on the host (a faster path, every device).

Why: for a prompt, mindone's thinker forward derives from device tensors what the host
already holds. It finds each modality's placeholder positions by comparing `input_ids` on
the device, checks their count by reading a boolean selection back, sums the audio masks,
cuts the audio frames out with a boolean index (a host read each), and merges each
modality's features with a `masked_scatter` between dtype casts. For a short image + audio
prompt those launches and reads cost about as much as the compiled layers themselves.

Here the processor's `input_ids`, masks and grids are taken from the host copies their tensors
keep (`host_positions.with_host_copy`; read once where a tensor has none), and numpy finds the
placeholders, checks their counts (mindone's messages, before any encoder runs), and builds
the indices that merge the text embeddings and every modality's features in one gather, and
the DeepStack features (image and video together) in one more. Encoders, rope index, text
model and head are the model's own (with whatever other fast paths are installed).

The merged embeddings are mindone's exactly: `masked_scatter` fills a modality's positions,
row by row, with its features in order, as features cast to the embeddings' dtype, and a
gather copies the same values to the same places (tests/mindone_changes/faster/test_thinker_prompt.py).

Covered: a prompt given as `input_ids` with its attention mask (as `generate` passes it), an
empty cache, no labels, no router logits; anything else keeps mindone's forward.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import mint, ops

from omni_helpers.mindone_changes.faster import host_positions


def applies(thinker, arguments: dict) -> bool:
    """Whether this thinker call (its arguments by name) is a prompt whose bookkeeping can be done on the host."""
    given = {name for name, value in arguments.items() if value is not None}
    if not {"input_ids", "attention_mask", "past_key_values"} <= given:
        return False
    if given & {"inputs_embeds", "position_ids", "labels"}:
        return False
    if "input_features" in given and "feature_attention_mask" not in given:
        return False  # mindone cannot encode audio without its mask either
    router_logits = arguments.get("output_router_logits")
    if thinker.config.text_config.output_router_logits if router_logits is None else router_logits:
        return False
    return arguments["past_key_values"].get_seq_length() == 0  # an empty cache: reads nothing


def used(arguments: dict) -> dict:
    """The arguments `forward` takes: without those `applies` requires to be None, and those mindone's
    prompt ignores (it recomputes the audio lengths from their mask, and the rope deltas)."""
    ignored = ("inputs_embeds", "position_ids", "labels", "rope_deltas", "audio_feature_lengths")
    return {name: value for name, value in arguments.items() if name not in ignored}


def forward(
    thinker,
    input_ids,
    attention_mask,
    past_key_values,
    input_features=None,
    feature_attention_mask=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    use_audio_in_video=False,
    video_second_per_grid=None,
    use_cache=None,
    cache_position=None,
    output_router_logits=None,
    **kwargs,
):
    """mindone's thinker outputs (`Qwen3OmniMoeThinkerCausalLMOutputWithPast`) for a prompt; sets the
    model's `rope_deltas` as mindone's forward does."""
    from mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeThinkerCausalLMOutputWithPast,
    )

    config = thinker.config
    ids, mask = host_positions.on_host(input_ids), host_positions.on_host(attention_mask)
    images, videos, audio_mask = map(host_positions.on_host, (image_grid_thw, video_grid_thw, feature_attention_mask))
    audio_lengths = None if audio_mask is None else audio_mask.sum(1)
    placeholders = {
        "audio": ids == config.audio_token_id,
        "image": ids == config.image_token_id,
        "video": ids == config.video_token_id,
    }
    expected = {"image": patch_rows(images, thinker.visual), "video": patch_rows(videos, thinker.visual)}
    for kind in ("image", "video"):  # mindone's checks, before any encoder runs
        if expected[kind] is not None and expected[kind] != placeholders[kind].sum():
            raise ValueError(mismatch_message(kind, int(placeholders[kind].sum()), expected[kind]))

    embeds = thinker.get_input_embeddings()(input_ids)
    features, deepstack = {}, {}
    if input_features is not None:
        features["audio"] = thinker.audio_tower(
            audio_frames(input_features, audio_mask),
            feature_lens=host_positions.with_host_copy(ms.Tensor(audio_lengths), audio_lengths),
        ).last_hidden_state
    if pixel_values is not None:
        features["image"], deepstack["image"] = thinker.get_image_features(pixel_values, image_grid_thw)
    if pixel_values_videos is not None:
        features["video"], deepstack["video"] = thinker.get_video_features(pixel_values_videos, video_grid_thw)
    embeds = merged_embeddings(embeds, features, placeholders)
    visual = placeholders["image"] | placeholders["video"]
    visual_embeds = merged_deepstack(deepstack, placeholders, visual)

    positions, deltas = host_positions.rope_index(
        config,
        thinker.spatial_merge_size,
        ids,
        images,
        videos,
        mask,
        use_audio_in_video,
        audio_lengths,
        host_positions.on_host(video_second_per_grid),
    )
    # mindone subtracts each row's count of padding (float32 minus int64: float32)
    thinker.rope_deltas = ms.Tensor((deltas - (1 - mask).sum(-1, keepdims=True)).astype(np.float32))

    outputs = thinker.model(
        attention_mask=attention_mask,
        position_ids=ms.Tensor(positions),
        past_key_values=past_key_values,
        inputs_embeds=embeds,
        use_cache=use_cache,
        output_router_logits=False,
        cache_position=cache_position,
        deepstack_visual_embeds=visual_embeds,
        visual_pos_masks=None
        if visual_embeds is None
        else host_positions.with_host_copy(ms.Tensor(visual[..., None]), visual[..., None]),
        **kwargs,
    )
    return Qwen3OmniMoeThinkerCausalLMOutputWithPast(
        logits=thinker.lm_head(outputs[0]),
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        past_key_values=outputs.past_key_values,
        rope_deltas=thinker.rope_deltas,
    )


def patch_rows(grid_thw, vision) -> int | None:
    """Rows the vision encoder returns for images or videos of `grid_thw`: patches over the merge window."""
    return None if grid_thw is None else int(np.prod(grid_thw, axis=1).sum()) // vision.spatial_merge_size**2


def mismatch_message(kind: str, tokens: int, features: int) -> str:
    """mindone's wording for images and videos (it does not check audio)."""
    label, placeholder = {"image": ("Image", "image"), "video": ("Videos", "image"), "audio": ("Audio", "audio")}[kind]
    return f"{label} features and {placeholder} tokens do not match: tokens: {tokens}, features {features}"


def audio_frames(input_features, feature_attention_mask: np.ndarray):
    """(mel, frames) of every audio's real frames, one after another: mindone's boolean selection, as a gather."""
    rows, mel, frames = input_features.shape
    real = np.flatnonzero(feature_attention_mask.reshape(-1))
    flat = ops.transpose(input_features, (0, 2, 1)).reshape(rows * frames, mel)
    return ops.transpose(ops.gather(flat, ms.Tensor(real), 0), (1, 0))


def merged_embeddings(embeds, features: dict, placeholders: dict):
    """The text embeddings with each modality's placeholders replaced by its features in order, as
    `masked_scatter` places them (features cast to the embeddings' dtype), by one gather."""
    if not features:
        return embeds
    rows, length, hidden = embeds.shape
    index = np.arange(rows * length)
    sources, offset = [embeds.reshape(rows * length, hidden)], rows * length
    for kind, rows_of_kind in features.items():
        where = np.flatnonzero(placeholders[kind].reshape(-1))
        if len(where) > rows_of_kind.shape[0]:  # `masked_scatter` would run out of features
            raise ValueError(mismatch_message(kind, len(where), rows_of_kind.shape[0]))
        index[where] = offset + np.arange(len(where))
        sources.append(rows_of_kind.to(embeds.dtype))
        offset += rows_of_kind.shape[0]
    return ops.gather(mint.cat(sources), ms.Tensor(index), 0).reshape(rows, length, hidden)


def merged_deepstack(deepstack: dict, placeholders: dict, visual: np.ndarray):
    """Each DeepStack level's image and video features in the order of their positions in the prompt
    (mindone's joint features when both are given); None without visual input."""
    if not deepstack:
        return None
    if len(deepstack) == 1:
        return next(iter(deepstack.values()))
    # the k-th visual position takes the next image row or the next video row, whichever it holds
    is_video = placeholders["video"][visual]
    order = np.where(is_video, len(is_video) - is_video.sum() + np.cumsum(is_video) - 1, np.cumsum(~is_video) - 1)
    index = ms.Tensor(order.astype(np.int64))
    return [
        ops.gather(mint.cat([image, video]), index, 0) for image, video in zip(deepstack["image"], deepstack["video"])
    ]
