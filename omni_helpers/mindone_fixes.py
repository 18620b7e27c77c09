"""Fixes for bugs in mindone 0.5.0's Qwen3-Omni, applied on every device.

Each fix replaces one mindone function where mindone and the transformers reference
disagree because mindone is wrong; each has a test that fails without it
(tests/test_mindone_fixes.py) and a line in the README's known issues.

- Audio longer than one encoder chunk (n_window * 2 mel frames: 1 s in the released
  config). `Qwen3OmniMoeAudioEncoder.construct` builds its chunk lengths with
  `ms.tensor([n] * chunk_num.sum())`, where `list * Tensor` multiplies elementwise
  instead of repeating the list (TensorScatterUpdate "indices out of range" on
  MindSpore 2.7.1, TypeError on 2.10); it then splits with `.item()` of a
  many-element tensor and keeps the padded frames of the last chunk. The replacement
  does the chunk bookkeeping on the host, as the reference does with Python lists.
- A video whose soundtrack is not used (`use_audio_in_video=False`, every silent or muted
  clip). `get_rope_index` times each video's seconds-per-grid with
  `second_per_grids[i].cpu()`, a PyTorch idiom: MindSpore tensors have no `.cpu()`, so
  the request fails after the model has loaded, on any device. The replacement hands
  mindone's own function a sequence whose items answer `.cpu()` with the same tensor.
- The generation loop prints a progress line per decoding step on stdout, which the
  scripts keep for the answer; the lines go to stderr instead (under msrun both land in
  the worker's log).
"""

from __future__ import annotations

import sys

import numpy as np

import mindspore as ms
from mindspore import mint

from .patching import PatchSet

MINDONE_FIXES = PatchSet("mindone fixes", package="mindone", written_for="0.5.0")
MODELING = "mindone.transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe"
AUDIO_ENCODER = f"{MODELING}.Qwen3OmniMoeAudioEncoder"
ROPE_OWNER = f"{MODELING}.Qwen3OmniMoePreTrainedModelForConditionalGeneration"
GENERATION_LOOP = "mindone.transformers.generation.utils"


def install_mindone_fixes() -> list[str]:
    """Install every fix for mindone's own bugs; returns the names of what was replaced."""
    return MINDONE_FIXES.install()


def conv_output_lengths(input_lengths: np.ndarray) -> np.ndarray:
    """Audio tokens produced from `input_lengths` mel frames (three stride-2 convolutions per 100-frame chunk)."""
    tail = input_lengths % 100
    tail_tokens = (((tail - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1
    return tail_tokens + (input_lengths // 100) * 13


def split_into_chunks(feature_lens: np.ndarray, chunk: int) -> list[int]:
    """Mel-frame lengths of the encoder chunks: whole chunks, then the remainder of each audio."""
    lengths = []
    for total in feature_lens.tolist():
        whole, rest = divmod(int(total), chunk)
        lengths += [chunk] * whole + ([rest] if rest else [])
    return lengths


@MINDONE_FIXES.replaces(f"{AUDIO_ENCODER}:construct")
def audio_encoder_construct(self, input_features, feature_lens=None, aftercnn_lens=None):
    """The audio encoder's forward with the chunking done right for any audio length.

    input_features: (mel, frames) of all audios of the batch, concatenated;
    feature_lens: frames per audio.
    """
    from mindone.transformers.modeling_outputs import BaseModelOutput

    chunk = self.n_window * 2
    feature_lens_np = feature_lens.asnumpy().astype(np.int64)
    chunk_lengths = split_into_chunks(feature_lens_np, chunk)

    # Cut the frames into chunks, pad each to the longest, and run the conv stack per chunk.
    frames = input_features.T  # (frames, mel)
    starts = np.concatenate([[0], np.cumsum(chunk_lengths)[:-1]]).tolist()
    longest = max(chunk_lengths)
    chunks = [
        mint.nn.functional.pad(frames[start : start + length], (0, 0, 0, longest - length))
        for start, length in zip(starts, chunk_lengths)
    ]
    padded = mint.stack(chunks).transpose(1, 2).unsqueeze(1)  # (chunks, 1, mel, longest)
    embeds = []
    for group in padded.split(self.conv_chunksize, dim=0):
        x = mint.nn.functional.gelu(self.conv2d1(group))
        x = mint.nn.functional.gelu(self.conv2d2(x))
        x = mint.nn.functional.gelu(self.conv2d3(x))
        embeds.append(x)
    x = mint.cat(embeds, dim=0)
    b, c, f, t = x.shape
    x = self.conv_out(x.permute(0, 3, 1, 2).reshape(b, t, c * f))
    x = x + self.positional_embedding.positional_embedding[:t, :].unsqueeze(0).to(x.dtype)

    # Keep only the positions that came from real frames (the last chunk may be short).
    tokens_per_chunk = conv_output_lengths(np.asarray(chunk_lengths, dtype=np.int64))
    valid = np.concatenate([i * t + np.arange(n) for i, n in enumerate(tokens_per_chunk.tolist())])
    hidden_states = x.reshape(b * t, -1)[ms.Tensor(valid.astype(np.int64))]

    # Attention windows: n_window_infer frames' worth of tokens, per audio.
    window = t * (self.n_window_infer // chunk)
    boundaries = [0]
    for tokens in conv_output_lengths(feature_lens_np).tolist():
        boundaries += [window] * (tokens // window) + ([tokens % window] if tokens % window else [])
    cu_seqlens = ms.Tensor(np.cumsum(boundaries).astype(np.int32))

    for layer in self.layers:
        hidden_states = layer(hidden_states, cu_seqlens)[0]
    hidden_states = self.ln_post(hidden_states)
    hidden_states = self.proj2(self.act(self.proj1(hidden_states)))
    return BaseModelOutput(last_hidden_state=hidden_states)


class _HostSeconds:
    """One video's seconds per temporal grid, as mindone's rope code reads it: `.cpu()` (a
    PyTorch idiom) gives the MindSpore tensor back, `.float()` converts as a tensor does."""

    def __init__(self, seconds):
        self.seconds = seconds

    def cpu(self):
        return self.seconds

    def float(self):
        return self.seconds.float()


@MINDONE_FIXES.replaces(f"{ROPE_OWNER}:get_rope_index")
def get_rope_index(self, input_ids=None, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                   use_audio_in_video=False, audio_seqlens=None, second_per_grids=None):  # fmt: skip
    """mindone's own 3-D rope index, given seconds per grid it can call `.cpu()` on.
    (The talker's get_rope_index calls this class's function by name, so it is fixed too.)"""
    if second_per_grids is not None:
        second_per_grids = [_HostSeconds(second_per_grids[i]) for i in range(second_per_grids.shape[0])]
    stock = MINDONE_FIXES.original(f"{ROPE_OWNER}:get_rope_index")
    return stock(self, input_ids, image_grid_thw, video_grid_thw, attention_mask,
                 use_audio_in_video, audio_seqlens, second_per_grids)  # fmt: skip


@MINDONE_FIXES.adds(f"{GENERATION_LOOP}:print")
def progress_to_stderr(*args, **kwargs):
    """The generation loop's `print` (one line per decoding step): to stderr, keeping stdout for answers."""
    kwargs.setdefault("file", sys.stderr)
    print(*args, **kwargs)
