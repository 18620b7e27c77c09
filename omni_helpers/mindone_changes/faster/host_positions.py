"""Positions computed on the host in numpy from host data (a faster path, every device):
the thinker's and talker's multimodal (3-D) rope positions, and the vision encoder's patch
positions (its rotary coordinates and its interpolated position-embedding table lookups).

mindone computes each of these by walking the prompt's tokens or the images' grids in
Python, with dozens of small device operations and host reads (`.item()`, `.tolist()`,
truth tests) per image, audio clip or video: for the tiny image + audio request on this
CPU about 10 ms for the rope index and 10 ms for the vision positions. Their inputs are
host data in the first place (token ids, grids, feature lengths, seconds per grid), so here
the same walks are done in numpy: each input from the host copy its tensor keeps (no read;
one where it has none), a few arrays back, and the
lookups that need the model's weights done on the device in a handful of operations.

The arithmetic follows mindone's in float32 (vision time indices are
`arange(t) * seconds per grid * positions per second`, every later start is the previous
maximum plus one; interpolation weights from a float32 `linspace`, as the CPU fallback
computes it), so the results are the same floats; tests/mindone_changes/faster/test_host_positions.py compares
them with mindone's on text, image + audio, video with and without its soundtrack.
"""

from __future__ import annotations

import numpy as np

HOST_COPY = "_host_copy"  # the attribute `with_host_copy` sets on a tensor


def with_host_copy(tensor, array: np.ndarray):
    """`tensor`, remembering the host array it was made from, so that `on_host` reads it without a device
    synchronisation. Only for tensors nothing writes in place: the processor's ids and masks, token ids."""
    setattr(tensor, HOST_COPY, array)
    return tensor


def on_host(value):
    """A tensor (or list) of the processor's, as numpy: its host copy where it has one, else read from the
    device; None stays None."""
    import mindspore as ms

    if value is None:
        return None
    if isinstance(value, ms.Tensor):
        copy = getattr(value, HOST_COPY, None)
        return value.asnumpy() if copy is None else copy
    return np.asarray(value)


def rope_index(
    config,
    spatial_merge_size: int,
    input_ids: np.ndarray,
    image_grid_thw,
    video_grid_thw,
    attention_mask: np.ndarray,
    use_audio_in_video: bool,
    audio_seqlens,
    second_per_grids,
):
    """(positions (3, rows, length) float32, deltas (rows, 1) float32) as mindone's `get_rope_index` returns them;
    the optional inputs are numpy arrays or None."""
    if image_grid_thw is None and video_grid_thw is None:
        return text_positions(attention_mask)
    positions = np.zeros((3, *input_ids.shape), np.float32)
    deltas = []
    counters = {"image": 0, "video": 0, "audio": 0}  # which image, video and audio come next, across rows
    for row in range(input_ids.shape[0]):
        real = attention_mask[row] == 1
        row_positions = row_rope_positions(
            config,
            spatial_merge_size,
            input_ids[row][real],
            image_grid_thw,
            video_grid_thw,
            use_audio_in_video,
            audio_seqlens,
            second_per_grids,
            counters,
        )
        positions[:, row, real] = row_positions
        deltas.append(row_positions.max() + np.float32(1) - np.float32(real.sum()))
    return positions, np.array(deltas, np.float32).reshape(-1, 1)


def text_positions(attention_mask: np.ndarray):
    """Positions counting the real tokens (padding gets 1), the same on the three axes."""
    mask = attention_mask.astype(np.float32)
    positions = np.cumsum(mask, -1, dtype=np.float32) - 1
    positions[attention_mask == 0] = 1
    deltas = positions.max(-1, keepdims=True) + 1 - attention_mask.sum(-1, keepdims=True)
    return np.broadcast_to(positions, (3, *positions.shape)).copy(), deltas.astype(np.float32)


def audio_output_length(feature_length: int) -> int:
    """Tokens the audio encoder gives for `feature_length` mel frames (mindone's `_get_feat_extract_output_lengths`)."""
    leave = feature_length % 100
    features = (leave - 1) // 2 + 1
    return ((features - 1) // 2 + 1 - 1) // 2 + 1 + (feature_length // 100) * 13


def row_rope_positions(
    config,
    merge: int,
    ids: np.ndarray,
    image_grid_thw,
    video_grid_thw,
    use_audio_in_video: bool,
    audio_seqlens,
    second_per_grids,
    counters: dict,
) -> np.ndarray:
    """One row's positions (3, real tokens): text runs count on from the last maximum, each image, audio clip and
    video gets its own block (a video heard with its soundtrack interleaves the two by time)."""
    vision_start, audio_start = config.vision_start_token_id, config.audio_start_token_id
    image_token, video_token, audio_token = config.image_token_id, config.video_token_id, config.audio_token_id
    per_second = config.position_id_per_seconds
    tokens = ids.tolist()
    after_vision_start = ids[np.flatnonzero(ids == vision_start) + 1]
    remain_audios = int((ids == audio_start).sum())
    remain_images = int((after_vision_start == image_token).sum())
    remain_videos = int((after_vision_start == (audio_start if use_audio_in_video else video_token)).sum())
    blocks = remain_images + remain_audios + (0 if use_audio_in_video else remain_videos)
    pieces: list[np.ndarray] = []
    start = 0  # index into tokens

    def next_position():
        return pieces[-1].max() + np.float32(1) if pieces else np.float32(0)

    def run(length, first):
        return np.broadcast_to(np.arange(length, dtype=np.float32) + first, (3, length))

    for _ in range(blocks):
        first = next_position()
        has_vision = (image_token in tokens or video_token in tokens) and (remain_videos > 0 or remain_images > 0)
        vision_at = tokens.index(vision_start, start) if has_vision else len(tokens) + 1
        audio_at = tokens.index(audio_start, start) if audio_token in tokens and remain_audios > 0 else len(tokens) + 1
        block_at = min(vision_at, audio_at)
        text_length = block_at - start
        if text_length:
            pieces.append(run(text_length, first))
            first = first + np.float32(text_length)
        audio_in_video = block_at == vision_at and vision_at + 1 == audio_at
        bos = eos = 2 if audio_in_video else 1
        pieces.append(run(bos, first))
        first = first + np.float32(bos)
        if block_at == audio_at:
            audio_length = audio_output_length(int(audio_seqlens[counters["audio"]]))
            pieces.append(run(audio_length, first))
            start += text_length + bos + audio_length + eos
            counters["audio"] += 1
            remain_audios -= 1
        elif ids[vision_at + 1] == image_token:
            grid = image_grid_thw[counters["image"]]
            times = (np.arange(int(grid[0])) * per_second).astype(np.float32)
            pieces.append(vision_positions(first, grid, merge, times))
            start += text_length + bos + int(np.prod(grid)) // merge**2 + eos
            counters["image"] += 1
            remain_images -= 1
        elif ids[vision_at + 1] == video_token:
            grid = video_grid_thw[counters["video"]]
            pieces.append(
                vision_positions(first, grid, merge, video_times(grid, second_per_grids[counters["video"]], per_second))
            )
            start += text_length + bos + int(np.prod(grid)) // merge**2 + eos
            counters["video"] += 1
            remain_videos -= 1
        elif audio_in_video:
            audio_length = audio_output_length(int(audio_seqlens[counters["audio"]]))
            grid = video_grid_thw[counters["video"]]
            video = vision_positions(
                first, grid, merge, video_times(grid, second_per_grids[counters["video"]], per_second)
            )
            pieces.extend(interleaved_by_time(video, run(audio_length, first)))
            start += text_length + bos + audio_length + int(np.prod(grid)) // merge**2 + eos
            counters["audio"] += 1
            counters["video"] += 1
            remain_audios -= 1
            remain_videos -= 1
        pieces.append(run(eos, next_position()))
    if start < len(tokens):
        pieces.append(run(len(tokens) - start, next_position()))
    return np.concatenate(pieces, axis=1).astype(np.float32)


def video_times(grid, seconds_per_grid, per_second) -> np.ndarray:
    """A video's temporal positions, in float32 as mindone multiplies them."""
    return np.arange(int(grid[0])).astype(np.float32) * np.float32(seconds_per_grid) * np.float32(per_second)


def vision_positions(first, grid, merge: int, times: np.ndarray) -> np.ndarray:
    """(time, row, column) of each merged patch, from `first` on."""
    height, width = int(grid[1]) // merge, int(grid[2]) // merge
    t = np.repeat(times.astype(np.float32), height * width)
    h = np.tile(np.repeat(np.arange(height, dtype=np.float32), width), len(times))
    w = np.tile(np.arange(width, dtype=np.float32), len(times) * height)
    return np.stack([t, h, w]) + first


def interleaved_by_time(video: np.ndarray, audio: np.ndarray) -> list[np.ndarray]:
    """Video and audio positions merged by their time axis (video first on ties), column by column."""
    merged, v, a = [], 0, 0
    while v < video.shape[1] and a < audio.shape[1]:
        if video[0, v] <= audio[0, a]:
            merged.append(video[:, v : v + 1])
            v += 1
        else:
            merged.append(audio[:, a : a + 1])
            a += 1
    if v < video.shape[1]:
        merged.append(video[:, v:])
    if a < audio.shape[1]:
        merged.append(audio[:, a:])
    return merged


# ----------------------------------------------------------------------------- the vision encoder's patches


def merge_window_order(height: int, width: int, merge: int) -> np.ndarray:
    """Raster patch indices of one frame, reordered window by window (each `merge` x `merge` window's
    patches adjacent), as the vision encoder orders its patches."""
    raster = np.arange(height * width).reshape(height // merge, merge, width // merge, merge)
    return raster.transpose(0, 2, 1, 3).reshape(-1)


def patch_coordinates(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(patches, 2) int64: each patch's (row, column) in its frame, in the encoder's window order."""
    coordinates = []
    for frames, height, width in grid_thw.tolist():
        order = merge_window_order(height, width, merge)
        frame = np.stack([order // width, order % width], axis=-1)
        coordinates.append(np.tile(frame, (frames, 1)))
    return np.concatenate(coordinates).astype(np.int64)


def interpolated_patch_positions(grid_thw: np.ndarray, grid_per_side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """The learned position table, bilinearly interpolated to each frame's grid: (4, patches) int64 table
    rows of the four neighbours and (4, patches) float32 weights, in the encoder's window order."""
    indices, weights = [], []
    for frames, height, width in grid_thw.tolist():
        corners, corner_weights = bilinear_corners(height, width, grid_per_side)
        order = np.tile(merge_window_order(height, width, merge), frames)
        indices.append(corners[:, order])
        weights.append(corner_weights[:, order])
    return np.concatenate(indices, axis=1), np.concatenate(weights, axis=1)


def bilinear_corners(height: int, width: int, grid_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """For a height x width grid over the table's grid_per_side x grid_per_side: the four neighbours' table
    rows and weights, (4, height * width) each, in raster order (as mindone's `fast_pos_embed_interpolate`)."""
    rows, columns = (np.linspace(0, grid_per_side - 1, n, dtype=np.float64).astype(np.float32) for n in (height, width))
    row_floor, column_floor = rows.astype(np.int32), columns.astype(np.int32)
    row_ceil = np.minimum(row_floor + 1, grid_per_side - 1)
    column_ceil = np.minimum(column_floor + 1, grid_per_side - 1)
    dr, dc = rows - row_floor.astype(np.float32), columns - column_floor.astype(np.float32)
    one = np.float32(1)
    indices = [
        row_floor[:, None] * grid_per_side + column_floor[None],
        row_floor[:, None] * grid_per_side + column_ceil[None],
        row_ceil[:, None] * grid_per_side + column_floor[None],
        row_ceil[:, None] * grid_per_side + column_ceil[None],
    ]
    weights = [
        (one - dr)[:, None] * (one - dc)[None],
        (one - dr)[:, None] * dc[None],
        dr[:, None] * (one - dc)[None],
        dr[:, None] * dc[None],
    ]
    return np.stack([i.reshape(-1) for i in indices]).astype(np.int64), np.stack([w.reshape(-1) for w in weights])
