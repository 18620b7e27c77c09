"""How the released model samples its speech codes, in MindSpore operations a compiled graph can hold.

transformers' Qwen3-Omni samples the talker's first code of each frame (its `generate` defaults, which
`request.settings` repeats) and always samples the code predictor's residual codes: top-k 50, top-p 0.8,
temperature 1. mindone 0.5.0 decodes the code predictor greedily (its comment: sampling made two cards
disagree). Here, while the talker samples (`--talker_do_sample`), the code predictor samples as released:

- the talker's code is chosen by the generation loop with mindone's logits processors (repetition penalty
  over the codes so far, the suppressed special codes, temperature, top-k, top-p) and its multinomial draw;
- the residual codes by `residual_code` below, in the PyNative step (`faster.decode_steps`) and in the
  compiled talker step (`faster.decode_graph`) alike. Both draw by inverse transform from one uniform number
  per code, drawn on the device at the start of each frame (`frame_uniforms`), so the two paths choose the
  same codes, and every msrun rank, seeded alike and running the same operations in the same order, draws
  the same numbers (the test compares the ranks' speech).

With the greedy talker (the default) the code predictor stays greedy: the path tested against the reference.
"""

from __future__ import annotations

import contextlib

import mindspore as ms
from mindspore import ops

CODE_PREDICTOR_TOP_K = 50  # transformers' talker passes these to its code predictor's `generate`
CODE_PREDICTOR_TOP_P = 0.8
SAMPLES = "samples_as_released"  # the code predictor's attribute, set for one `generate` call


@contextlib.contextmanager
def code_predictor_sampling(model, sampling: bool):
    """For one `generate` call: the code predictor samples (True) or stays greedy."""
    predictor = model.talker.code_predictor if getattr(model, "has_talker", False) else None
    if predictor is None:
        yield
        return
    setattr(predictor, SAMPLES, sampling)
    try:
        yield
    finally:
        setattr(predictor, SAMPLES, False)


def samples(code_predictor) -> bool:
    return getattr(code_predictor, SAMPLES, False)


def frame_uniforms(rows: int, codes: int):
    """(rows, codes) numbers in [0, 1): one per residual code of a frame, from the run's seeded stream."""
    return ops.uniform((rows, codes), ms.Tensor(0.0, ms.float32), ms.Tensor(1.0, ms.float32), dtype=ms.float32)


def filtered_probabilities(logits, top_k: int, top_p: float, temperature: float = 1.0):
    """(rows, vocab) logits -> the distribution transformers' warpers leave, in their order: temperature,
    then the top-k logits kept, then the smallest set of the most likely codes whose probability exceeds
    `top_p` kept (the most likely always), renormalised."""
    scores = logits.astype(ms.float32) / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = ops.topk(scores, top_k)[0][:, -1:]
        scores = ops.masked_fill(scores, scores < kth_largest, float("-inf"))
    if top_p < 1.0:
        ascending, order = ops.sort(scores, -1)
        cumulative = ops.cumsum(ops.softmax(ascending, -1), -1)
        dropped = ops.concat((cumulative[:, :-1] <= 1 - top_p, ops.zeros((scores.shape[0], 1), ms.bool_)), -1)
        back = ops.sort(order.astype(ms.float32), -1)[1]  # where each code went in the sorted order
        scores = ops.masked_fill(scores, ops.gather_elements(dropped, -1, back), float("-inf"))
    return ops.softmax(scores, -1)


def draw(probabilities, uniform):
    """(rows, vocab) probabilities, (rows,) numbers in [0, 1) -> (rows,) codes: the first code whose cumulative
    probability exceeds the number (scaled by the row's total), so each code is drawn with its probability."""
    cumulative = ops.cumsum(probabilities, -1)
    below = (cumulative <= uniform.reshape(-1, 1) * cumulative[:, -1:]).astype(ms.int32).sum(-1)
    return ops.minimum(below, probabilities.shape[-1] - 1)


def residual_code(logits, uniform=None):
    """One residual code per row from the code predictor's (rows, vocab) logits: drawn as released when
    `uniform` (rows,) is given, the most likely otherwise."""
    if uniform is None:
        return ops.argmax(logits, -1)
    return draw(filtered_probabilities(logits, CODE_PREDICTOR_TOP_K, CODE_PREDICTOR_TOP_P), uniform)
