"""Watching a generation as it happens, through the protocols `generate` already has.

mindone's `generate` takes a transformers-style streamer per stage (`thinker_streamer`,
`talker_streamer`) and calls its `put` once with the prompt, then once per decoding step
with the token chosen for every row, and `end` when it stops. `StepStream` records when
each call came (so prefill and decode are timed apart without touching the model), the
collective bytes moved so far, and the tokens of each row; with a tokenizer and an
`on_text` callback it also hands out each row's new text as it appears.

A streamer costs a host read per step (`generate` hands it the tokens as numpy). When no
text is streamed, `watch` times the stage by forward hooks instead (the first forward's
start, then every forward's end), which read nothing, and the tokens are read from the
finished sequences (`take_tokens`).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from omni_helpers.measuring.forward_taps import listen

# on_text(row, piece): called with each new piece of a row's answer, in order.
TextCallback = Callable[[int, str], None]
REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to, until its next bytes arrive


class TextPieces:
    """One row's answer, handed out piece by piece as its tokens arrive.

    The answer is decoded whole at every step (byte-level tokens can split a character),
    and only text that cannot change any more is handed out: a trailing replacement
    character may still become a character. The pieces joined equal the final decode.
    """

    def __init__(self, tokenizer, row: int, on_text: TextCallback):
        self.tokenizer, self.row, self.on_text = tokenizer, row, on_text
        self.sent = ""

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def update(self, tokens: list[int], final: bool = False) -> None:
        text = self._decode(tokens)
        stable = text if final else text.rstrip(REPLACEMENT)
        if len(stable) > len(self.sent) and stable.startswith(self.sent):
            self.on_text(self.row, stable[len(self.sent) :])
            self.sent = stable


class StepStream:
    """A streamer for one stage of one `generate` call."""

    def __init__(
        self,
        rows: int = 1,
        eos_token_id: Optional[int] = None,
        traffic=None,
        tokenizer=None,
        on_text: Optional[TextCallback] = None,
    ):
        self.rows, self.eos_token_id, self.traffic = rows, eos_token_id, traffic
        self.times: list[float] = []  # perf_counter of every put: [prompt, first token, second token, ...]
        self.bytes: list[float] = []  # collective bytes counted so far, at each put
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # each row's tokens up to and with its end token
        self.finished = [False] * rows
        self.on_text = on_text
        self.first_piece_step: Optional[int] = None  # the decoding step at which text first went out
        self.first_token_at: Optional[float] = None
        self.pieces = [TextPieces(tokenizer, row, self._hand_out) for row in range(rows)] if on_text else []
        self.on_end: Optional[Callable[[], None]] = None  # called when the stage ends, after the last pieces

    def _hand_out(self, row: int, piece: str) -> None:
        if self.first_piece_step is None:
            self.first_piece_step = self.steps
        self.on_text(row, piece)

    def _tick(self) -> None:
        if len(self.times) == 1:
            self.first_token_at = time.time()  # wall clock, for start-up figures
        self.times.append(time.perf_counter())
        self.bytes.append(self.traffic.bytes if self.traffic is not None else 0.0)

    def watch(self, cell) -> list:
        """Time `cell`'s forwards in place of the streamer's calls: the first one's start stands for the
        prompt, each one's end for the token chosen after it. Returns handles to `remove()`."""

        def before(*_):
            if not self.times:
                self._tick()

        def after(*_):
            self._tick()

        return listen(cell, before, after)

    def take_tokens(self, new_tokens: np.ndarray) -> None:
        """Each row's tokens, up to and with its end token, from the finished sequences."""
        for row in range(self.rows):
            ends = np.flatnonzero(new_tokens[row] == self.eos_token_id)
            self.tokens[row] = new_tokens[row, : ends[0] + 1 if len(ends) else len(new_tokens[row])].tolist()

    def put(self, value) -> None:
        self._tick()
        if len(self.times) == 1:
            return  # the prompt
        chosen = np.asarray(value).reshape(-1)
        for row in range(self.rows):
            if self.finished[row]:
                continue  # rows that have ended get padding until the longest ends
            self.tokens[row].append(int(chosen[row]))
            self.finished[row] = int(chosen[row]) == self.eos_token_id
            if self.pieces:
                self.pieces[row].update(self.tokens[row])

    def end(self) -> None:
        for piece in self.pieces:
            piece.update(self.tokens[piece.row], final=True)
        if self.on_end is not None:
            self.on_end()

    # ------------------------------------------------------------------------- timings

    @property
    def steps(self) -> int:
        """Decoding steps taken (tokens chosen per row, padding included)."""
        return max(len(self.times) - 1, 0)

    @property
    def prefill_seconds(self) -> float:
        """From the prompt to the first token: the encoders and the prompt's forward."""
        return self.times[1] - self.times[0] if len(self.times) > 1 else 0.0

    @property
    def decode_seconds(self) -> float:
        """From the first token to the last: one forward per further token."""
        return self.times[-1] - self.times[1] if len(self.times) > 2 else 0.0

    @property
    def seconds(self) -> float:
        return self.times[-1] - self.times[0] if self.times else 0.0

    @property
    def decode_bytes(self) -> float:
        """Collective bytes of the decode steps (after the first token)."""
        return self.bytes[-1] - self.bytes[1] if len(self.bytes) > 2 else 0.0
