"""Streamed text: the pieces handed to on_text arrive in order and join to the final answer,
even when a byte-level token splits a character."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def stream_tokens(tokenizer, ids: list[int]):
    from omni_helpers.streaming import StepStream

    pieces = []
    stream = StepStream(rows=1, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer=tokenizer,
                        on_text=lambda row, piece: pieces.append(piece))  # fmt: skip
    stream.put(np.array([[1, 2, 3]]))  # the prompt
    for token in ids:
        stream.put(np.array([token]))
    stream.end()
    return pieces


def test_pieces_join_to_the_answer_and_never_hold_a_half_character(tokenizer):
    ids = tokenizer.encode("héllo wörld, 你好 see") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(ids) > 12  # byte-level: the accented and CJK characters take several tokens each
    pieces = stream_tokens(tokenizer, ids)
    assert "".join(pieces) == "héllo wörld, 你好 see"
    assert len(pieces) > 5 and all("\ufffd" not in piece for piece in pieces)


def test_bytes_that_never_form_a_character_still_arrive_at_the_end(tokenizer):
    stray = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("é")[0])  # the first byte alone
    pieces = stream_tokens(tokenizer, tokenizer.encode("ab") + [stray])
    expected = tokenizer.decode(tokenizer.encode("ab") + [stray])
    assert "".join(pieces) == expected and expected.endswith("\ufffd")
