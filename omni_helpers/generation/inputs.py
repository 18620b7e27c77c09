"""Turning processor outputs into what mindone's `generate` takes."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def to_mindspore(inputs: Mapping[str, Any], float_dtype) -> dict[str, Any]:
    """numpy arrays -> `ms.Tensor`: integer ids as int32 (what mindone's generation uses), each keeping
    its host copy (the prompt's bookkeeping reads them there, not from the device), everything else
    (pixel values, mel features, seconds per grid) in the model's float dtype."""
    import mindspore as ms

    from omni_helpers.mindone_changes.faster.host_positions import with_host_copy

    converted = {}
    for key, value in inputs.items():
        if isinstance(value, np.ndarray):
            tensor = ms.tensor(value)
            if tensor.dtype in (ms.int64, ms.int32):
                tensor = with_host_copy(tensor.astype(ms.int32), value.astype(np.int32))
            elif tensor.dtype != float_dtype:
                tensor = tensor.astype(float_dtype)
            value = tensor
        converted[key] = value
    return converted


def videos_to_numpy(videos):
    """qwen_omni_utils returns video frames as torch tensors; mindone's processor takes numpy."""
    if videos is None:
        return None
    return [video.numpy() if hasattr(video, "numpy") else video for video in videos]
