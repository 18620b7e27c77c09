"""Cancelling a generation (omni_helpers/request/cancellation.py, read by the loop in decode_loop.py): it stops at the
next decoding step of the thinker or of the talker, and the model answers the next request as if nothing happened.

(Under msrun, the server tests close a stream mid-answer: tests/test_web_demo.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from omni_helpers.request.cancellation import Cancellation
from omni_helpers.request.errors import Cancelled
from omni_helpers.request.settings import GenerationSettings

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def text_inputs(tiny_checkpoint, mindone):
    from tests.reference import batch_inputs

    return batch_inputs(tiny_checkpoint, [[{"role": "user", "content": "Describe the sound of rain."}]], False)


def generate(mindone, inputs, cancellation=None, on_text=None, on_audio=None, **settings):
    from omni_helpers.generation.core import generate_from_inputs

    settings = GenerationSettings(**{"max_new_tokens": NEW_TOKENS, "use_audio_in_video": False, **settings})
    return generate_from_inputs(
        mindone.model,
        mindone.processor,
        inputs,
        settings,
        on_text=on_text,
        on_audio=on_audio,
        cancellation=cancellation,
    )[0]


def steps_taken(error: pytest.ExceptionInfo) -> int:
    return int(str(error.value).split("after ")[1].split()[0])


def test_a_generation_cancelled_mid_answer_stops_at_the_next_step(mindone, text_inputs):
    whole = generate(mindone, text_inputs)
    assert len(whole.token_ids) == NEW_TOKENS  # random weights: no end token this early (else the test shows nothing)
    cancellation, pieces = Cancellation(), []

    def cancel_after_three(row, piece):
        pieces.append(piece)
        if len(pieces) == 3:
            cancellation.cancel()

    with pytest.raises(Cancelled) as stopped:
        generate(mindone, text_inputs, cancellation, on_text=cancel_after_three)
    assert len(pieces) == 3 and steps_taken(stopped) <= 4  # the step that handed out the third piece, or the next
    again = generate(mindone, text_inputs, Cancellation())  # a cancellation never set changes nothing
    assert again.token_ids == whole.token_ids and again.text == whole.text


def test_a_cancellation_set_before_the_request_stops_it_after_the_prompt(mindone, text_inputs):
    cancellation = Cancellation()
    cancellation.cancel()
    with pytest.raises(Cancelled) as stopped:
        generate(mindone, text_inputs, cancellation)
    assert steps_taken(stopped) == 1


def test_speech_is_cancelled_at_the_talkers_next_frame(mindone, text_inputs):
    """Cancelled while the talker speaks (at its first streamed chunk, 4 frames in), of a request asking for 40."""
    cancellation, chunks = Cancellation(), []

    def cancel_at_first_speech(row, samples):
        chunks.append(samples)
        cancellation.cancel()

    with pytest.raises(Cancelled) as stopped:
        generate(
            mindone,
            text_inputs,
            cancellation,
            on_audio=cancel_at_first_speech,
            max_new_tokens=4,
            return_audio=True,
            talker_max_new_tokens=40,
        )
    assert len(chunks) == 1 and steps_taken(stopped) <= 6


def test_mindones_own_loop_sees_a_cancellation_as_every_row_done():
    """Where the project's loop does not run, the cancellation is an ordinary stopping criterion."""
    import mindspore as ms

    ids = ms.Tensor(np.zeros((3, 5), np.int64))
    cancellation = Cancellation()
    assert cancellation(ids, None).asnumpy().tolist() == [False] * 3
    cancellation.cancel()
    assert cancellation(ids, None).asnumpy().tolist() == [True] * 3
