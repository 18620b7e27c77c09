"""Calling mindone's `generate` the same way from every script, and reading its result."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any


def generation_kwargs(args: argparse.Namespace, config, return_audio: bool) -> dict[str, Any]:
    """Keyword arguments for `Qwen3OmniMoeForConditionalGeneration.generate`.

    `generate` routes `thinker_*` / `talker_*` keywords to each stage; a bare
    `max_new_tokens` would not reach the thinker. The thinker's end-of-turn id is read
    from the checkpoint (mindone hard-codes the released one, 151645).
    """
    kwargs: dict[str, Any] = {
        "return_audio": return_audio,
        "thinker_return_dict_in_generate": True,
        "thinker_max_new_tokens": args.max_new_tokens,
        "thinker_eos_token_id": config.im_end_token_id,
        "thinker_do_sample": args.do_sample,
    }
    if args.do_sample:
        kwargs.update(thinker_temperature=args.temperature, thinker_top_p=args.top_p, thinker_top_k=args.top_k)
    if return_audio:
        kwargs.update(
            speaker=args.speaker,
            talker_max_new_tokens=args.talker_max_new_tokens,
            talker_do_sample=args.talker_do_sample,
        )
    return kwargs


@contextlib.contextmanager
def progress_to_stderr():
    """mindone prints a line per decoding step to stdout; keep stdout for the answer."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def new_tokens(sequences, prompt_length: int):
    """The generated part of `sequences` (batch, prompt + new)."""
    return sequences[:, prompt_length:]


def decode_answer(processor, text_ids, prompt_length: int) -> str:
    """The text of the first (only) sequence's new tokens."""
    return processor.batch_decode(
        new_tokens(text_ids.sequences, prompt_length), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )[0]


def waveform_to_numpy(waveform):
    """generate()'s speech (a Tensor, or None without a talker) as a flat float32 array."""
    return None if waveform is None else waveform.reshape(-1).float().asnumpy()
