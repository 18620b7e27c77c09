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
    from omni_helpers.generation.streaming import StepStream

    pieces = []
    stream = StepStream(
        rows=1,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer=tokenizer,
        on_text=lambda row, piece: pieces.append(piece),
    )
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


def test_several_rows_each_stream_their_own_answer_when_one_ends_first(tokenizer):
    """Three rows in one call: the first ends after two tokens (then gets padding), the others go on; every row's
    pieces join to its own answer."""
    from omni_helpers.generation.streaming import StepStream

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = ["ok", "a longer answer, still going", "third row too"]
    ids = [tokenizer.encode(text) + [eos] for text in answers]
    steps = max(len(row) for row in ids)
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    stream = StepStream(
        rows=3, eos_token_id=eos, tokenizer=tokenizer, on_text=lambda row, piece: pieces[row].append(piece)
    )
    stream.put(np.zeros((3, 4), np.int64))  # the prompt
    for step in range(steps):  # rows that have ended get padding (the end token again), as generate hands them
        stream.put(np.array([row[step] if step < len(row) else eos for row in ids]))
    stream.end()
    assert ["".join(pieces[row]) for row in range(3)] == answers
    assert stream.tokens == ids and all(len(pieces[row]) > 1 for row in (1, 2))


def test_streamed_speech_past_a_code2wav_chunk_joins_to_the_whole_waveform(mindone):
    """330 frames: past the first 300-frame chunk, so the stream hands out the first chunk's rest, then the second
    chunk decoded with its 25 frames of left context; every sample once, in order, as `chunked_decode` gives them,
    each emission decoding its new frames behind a fixed context (a constant cost)."""
    from types import SimpleNamespace

    import mindspore as ms

    from omni_helpers.generation.speech_stream import CONV_CONTEXT_FRAMES, STREAM_CONTEXT_FRAMES, SpeechStreams

    code2wav = mindone.model.code2wav
    groups, size = code2wav.config.num_quantizers, code2wav.config.codebook_size
    codes = np.random.default_rng(0).integers(0, size, (330, 1, groups)).astype(np.int64)
    chunks = []
    streams = SpeechStreams(
        code2wav, lambda row, samples: chunks.append(samples), 1, -1, first_frames=4, every_frames=40
    )
    streams.hook(None, None, SimpleNamespace(hidden_states=(None, None)))  # the talker's prompt: no frame yet
    for frame in codes:
        streams.hook(None, None, SimpleNamespace(hidden_states=(None, ms.Tensor(frame))))
    stream = streams.rows[0]
    whole = code2wav.chunked_decode(ms.Tensor(codes[:, 0].T[None]), chunk_size=300, left_context_size=25)
    whole = whole.reshape(-1).float().asnumpy()
    streamed = sum(len(chunk) for chunk in chunks)  # handed out while the talker spoke, before the end
    assert streamed > 320 * int(code2wav.total_upsample)  # the second chunk's frames too, not only the first's 300
    stream.finish(whole)
    joined = np.concatenate(chunks)
    assert len(chunks) > 8 and stream.first_audio_step == 5  # the first speech after 4 frames
    assert joined.shape == whole.shape
    np.testing.assert_allclose(joined, whole, atol=5e-5)  # one attention layer within the context: measured 3.0e-5
    assert max(stream.frames_per_emission) <= 40 + STREAM_CONTEXT_FRAMES  # not the 300 frames of a whole chunk
    assert stream.frames_per_emission[-1] <= 30 + 25  # the second chunk from its own left context, as generate
    # the convolutions (nearly all of code2wav's work) see the new frames and no more context than they reach
    assert max(stream.conv_frames_per_emission) == 40 + CONV_CONTEXT_FRAMES
    assert stream.conv_frames_per_emission[-1] == 324 - 300 + CONV_CONTEXT_FRAMES  # the second chunk's first 24


def test_rows_in_step_decode_each_emission_as_one_code2wav_batch(mindone):
    """Two rows streamed together: an emission is one code2wav call for both, each row's chunks joining to its own
    waveform; the row whose end code comes at frame 50 stops there, the other goes on alone."""
    from types import SimpleNamespace

    import mindspore as ms

    from omni_helpers.generation.speech_stream import SpeechStreams

    code2wav = mindone.model.code2wav
    groups, size = code2wav.config.num_quantizers, code2wav.config.codebook_size
    end_code = size  # a code no random frame holds
    codes = np.random.default_rng(1).integers(0, size, (120, 2, groups)).astype(np.int64)
    codes[50:, 1, 0] = end_code  # row 1 ends at frame 50 (the loop gives it padding codes from there)
    chunks = ([], [])
    streams = SpeechStreams(
        code2wav, lambda row, samples: chunks[row].append(samples), 2, end_code, first_frames=4, every_frames=12
    )
    streams.hook(None, None, SimpleNamespace(hidden_states=(None, None)))
    for frame in codes:
        streams.hook(None, None, SimpleNamespace(hidden_states=(None, ms.Tensor(frame))))
    lengths = (120, 50)
    for row, stream in enumerate(streams.rows):
        whole = code2wav.chunked_decode(ms.Tensor(codes[: lengths[row], row].T[None]), chunk_size=300)
        whole = whole.reshape(-1).float().asnumpy()
        stream.finish(whole)
        np.testing.assert_allclose(np.concatenate(chunks[row]), whole, atol=5e-5)
    emissions = [len(stream.frames_per_emission) for stream in streams.rows]
    assert emissions[1] < emissions[0]  # row 1 stopped at its end
    # row 1's emissions rode in row 0's calls, but for the one its end cut short (its last frames decoded apart)
    assert streams.decodes == emissions[0] + 1


def test_generates_own_whole_decode_is_answered_from_the_streams_and_put_back_after(mindone):
    """While speech streams, `chunked_decode` (generate's last code2wav pass over the whole answer) is answered from
    the streams: their last frames go out as one more emission, and each row's waveform is what it was handed, within
    the streams' accuracy of decoding the codes whole. Afterwards code2wav's own method, or one a caller had put on
    the instance, is back."""
    from types import SimpleNamespace

    import mindspore as ms

    from omni_helpers.generation.speech_stream import SpeechStreams

    code2wav = mindone.model.code2wav
    groups, size = code2wav.config.num_quantizers, code2wav.config.codebook_size
    end_code = size
    codes = np.random.default_rng(2).integers(0, size, (30, 2, groups)).astype(np.int64)
    codes[20:, 1, 0] = end_code  # row 1 ends at frame 20
    chunks = ([], [])
    streams = SpeechStreams(code2wav, lambda row, samples: chunks[row].append(samples), 2, end_code)
    streams.hook(None, None, SimpleNamespace(hidden_states=(None, None)))
    for frame in codes:
        streams.hook(None, None, SimpleNamespace(hidden_states=(None, ms.Tensor(frame))))
    alone = [
        code2wav.chunked_decode(ms.Tensor(codes[:length, row].T[None]), chunk_size=300).reshape(-1).float().asnumpy()
        for row, length in enumerate((30, 20))
    ]
    handed = [sum(len(chunk) for chunk in row_chunks) for row_chunks in chunks]
    assert handed[0] < len(alone[0])  # frames 28 and 29 were not out yet

    def callers_own(*args, **kwargs):
        raise AssertionError("not while streaming")

    recorder = code2wav.__dict__.get("chunked_decode")  # the session's (tests.reference.MindOne records codes)
    try:
        code2wav.__dict__.pop("chunked_decode", None)
        with streams.answering_whole_decode():
            whole = code2wav.chunked_decode(ms.Tensor(codes.transpose(1, 2, 0)), chunk_size=300, left_context_size=25)
        assert "chunked_decode" not in code2wav.__dict__  # code2wav's own method again
        code2wav.chunked_decode = callers_own
        with streams.answering_whole_decode():
            again = code2wav.chunked_decode(ms.Tensor(codes.transpose(1, 2, 0)), chunk_size=300, left_context_size=25)
        assert code2wav.chunked_decode is callers_own  # the caller's again
    finally:
        code2wav.__dict__.pop("chunked_decode", None)
        if recorder is not None:
            code2wav.chunked_decode = recorder
    assert np.array_equal(again.asnumpy(), whole.asnumpy())  # nothing left to decode the second time
    whole = whole.asnumpy()
    assert whole.shape == (2, 1, len(alone[0]))
    for row, expected in enumerate(alone):
        joined = np.concatenate(chunks[row])
        assert len(joined) == len(expected) and np.array_equal(whole[row, 0, : len(expected)], joined), row
        np.testing.assert_allclose(joined, expected, atol=5e-5)
    assert not whole[1, 0, len(alone[1]) :].any()  # the shorter row padded with zeros, as the caller cuts
