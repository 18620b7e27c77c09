"""Speech handed out while the talker is still speaking, each row of a batch its own.

mindone's `generate` decodes the talker's codec frames with code2wav only after the talker
has finished. A forward hook on the talker (`SpeechStreams.hook`, installed for one `generate`
call) sees each frame's codes, one per row, as the next step begins, and every few frames each
row's `SpeechStream` decodes what there is of its current code2wav chunk, handing out the
samples not handed out yet. A row of a batch ends at its end code while the others go on (the
loop gives it padding from there): its stream stops at that code, read once per emission for
every due row. The rows of a batch are in step, so the rows due at a step decode their new
frames as one code2wav batch, one call per emission whatever the batch size.

Each emission decodes only the frames not handed out yet, behind a fixed left context, so its
cost stays the same however long the answer grows. code2wav is a transformer (its attention
reaches far back) and then a stack of causal convolutions that make 1920 samples of each frame
(nearly all of its work at the released size: about 2 of its 2.1 GMAC per frame). The
transformer takes `STREAM_CONTEXT_FRAMES` of context; the convolutions only
`CONV_CONTEXT_FRAMES`, as far back as their receptive field reaches (`decode_frames`). Within
each of `generate`'s 300-frame code2wav chunks the context reaches back no further than that
chunk's own (25 frames before it, as mindone's `chunked_decode` decodes it). code2wav is causal:
a sample depends on the frames before it, through its attention layers' 72-frame windows. With
one layer (the tiny checkpoint) 100 frames of context give `generate`'s own samples (measured:
3.0e-5 at most; 72 frames: 0.11). The released code2wav has 8 such layers, so frames further back
than 100 can still add a little: less than `chunked_decode` itself leaves out at each chunk's
start, where it keeps 25. At its end `generate` decodes the whole answer with code2wav again;
while speech is streamed that pass is answered from the streams instead (`whole_waveforms`):
the frames not handed out yet go out as one last emission, and each row's waveform is the samples
it was handed.

Every msrun rank installs the same hook, so under ZeRO-3 code2wav's collectives stay in step.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Optional

import numpy as np

from omni_helpers.mindone_changes.batched_speech import CHUNK_FRAMES, LEFT_CONTEXT_FRAMES  # generate's chunks

SPEECH_SAMPLE_RATE = 24000  # code2wav's output rate
STREAM_CONTEXT_FRAMES = 100  # frames code2wav's transformer sees again before the new ones at each emission
# Frames its convolutions see again: their receptive field ends within 8 frames (upsampling rates, kernels and
# dilations are the same in every checkpoint; measured on random weights: samples past 6 frames of context 5e-6 from
# the whole decode's, past 8 identical).
CONV_CONTEXT_FRAMES = 10

# on_audio(row, samples): float32 samples in [-1, 1], 24 kHz mono, each row's in order.
AudioCallback = Callable[[int, np.ndarray], None]


class SpeechStreams:
    """The talker hook of a generation that streams speech: each frame's codes to each row's `SpeechStream`; the
    rows due for an emission at the same step decode their new frames as one code2wav batch."""

    def __init__(self, code2wav, on_audio: AudioCallback, rows: int, end_code: int, **cadence):
        self.code2wav = code2wav
        self.rows = [
            SpeechStream(code2wav, functools.partial(on_audio, row), end_code, **cadence) for row in range(rows)
        ]
        self.steps = 0  # talker forwards seen
        self.decodes = 0  # code2wav calls made for the emissions

    def hook(self, cell, inputs, outputs) -> None:
        """Forward hook on the talker: the codes (rows, groups) of the frame before this step (none at the prefill)."""
        self.steps += 1
        codes = outputs.hidden_states[-1]
        if codes is None:
            return
        from mindspore import mint

        rows = (codes,) if len(self.rows) == 1 else mint.split(codes, 1)  # one launch for every row's (1, groups)
        due = [stream for stream, row_codes in zip(self.rows, rows) if stream.add(row_codes, self.steps)]
        if due:
            self.emit(due)

    def emit(self, due: list["SpeechStream"]) -> None:
        """The due rows' new samples: their end codes read at once, then, span by span, one code2wav call for the
        rows whose next span is the same frames (rows in step with each other, as a batch's rows are)."""
        end_at_end_codes(due)
        while True:
            spans: dict[tuple[int, int, int], list[SpeechStream]] = {}
            for stream in due:
                span = stream.next_span()
                if span is not None:
                    spans.setdefault(span, []).append(stream)
            if not spans:
                return
            for (start, conv_start, end), streams in spans.items():
                frames = [stream.frames[start:end] for stream in streams]
                samples = decode_frames(self.code2wav, frames, conv_start - start)
                self.decodes += 1
                for stream, row_samples in zip(streams, samples):
                    stream.take(row_samples, start, conv_start, end)

    def finish(self, waveforms: list) -> None:
        for stream, waveform in zip(self.rows, waveforms):
            stream.finish(waveform)

    @contextlib.contextmanager
    def answering_whole_decode(self):
        """While the generation runs, `generate`'s own code2wav pass at its end (`chunked_decode`) is answered from
        the streams (`whole_waveforms`): they have decoded all but the last few frames already, so decoding the whole
        answer again would double code2wav's work."""
        replaced = self.code2wav.__dict__.get("chunked_decode")  # an instance's own, if it has one
        self.code2wav.chunked_decode = self.whole_waveforms
        try:
            yield
        finally:
            if replaced is None:
                del self.code2wav.chunked_decode
            else:
                self.code2wav.chunked_decode = replaced

    def whole_waveforms(self, codes, chunk_size: int = CHUNK_FRAMES, left_context_size: int = LEFT_CONTEXT_FRAMES):
        """What `chunked_decode(codes)` returns, (rows, 1, samples), from the streams: the frames not decoded yet go
        out as one last emission, then each row's samples are joined (a row that ended early padded with zeros, which
        the caller cuts). Within `STREAM_CONTEXT_FRAMES`' accuracy of decoding the codes whole."""
        from mindspore import Tensor

        if (chunk_size, left_context_size) != (CHUNK_FRAMES, LEFT_CONTEXT_FRAMES) or codes.shape[0] != len(self.rows):
            raise ValueError(f"streamed speech answers generate's own decode only, not {tuple(codes.shape)} codes")
        rest = [stream for stream in self.rows if stream.decoded_frames < len(stream.frames)]
        if rest:  # none when the last frame fell on an emission
            self.emit(rest)
        joined = [np.concatenate(stream.sent or [np.zeros(0, np.float32)]) for stream in self.rows]
        whole = np.zeros((len(joined), 1, max(len(samples) for samples in joined)), np.float32)
        for row, samples in enumerate(joined):
            whole[row, 0, : len(samples)] = samples
        return Tensor(whole)


def end_at_end_codes(streams: list["SpeechStream"]) -> None:
    """Each stream's frames from its end code on dropped: one read of every stream's new frames' first codes."""
    from mindspore import mint

    firsts = mint.cat([codes[:, 0] for stream in streams for codes in stream.frames[stream.decoded_frames :]])
    firsts = firsts.asnumpy()
    at = 0
    for stream in streams:
        new = firsts[at : at + len(stream.frames) - stream.decoded_frames]
        at += len(new)
        if (new == stream.end_code).any():
            stream.frames = stream.frames[: stream.decoded_frames + int(np.argmax(new == stream.end_code))]
            stream.ended = True


def decode_frames(code2wav, rows_frames: list[list], conv_skip: int = 0) -> list[np.ndarray]:
    """code2wav's samples of each row's frames (each row as many, (1, groups) codes each) from the frame `conv_skip`
    on, decoded as one batch: code2wav's rows are independent, so each row's samples are those it gets alone.
    mindone's `Code2Wav.construct`, step by step, with the transformer over every frame and the convolutions over
    the frames from `conv_skip` on: the frames before it are the transformer's context only."""
    from mindspore import mint

    codes = mint.cat([mint.stack(frames, dim=1) for frames in rows_frames]).transpose(1, 2)  # (rows, groups, frames)
    if codes.shape[1] != code2wav.config.num_quantizers:
        raise ValueError(f"code2wav takes {code2wav.config.num_quantizers} codes per frame, not {codes.shape[1]}")
    hidden = code2wav.code_embedding(codes + code2wav.code_offset).mean(1)
    hidden = code2wav.pre_transformer(inputs_embeds=hidden).last_hidden_state
    waveform = hidden[:, conv_skip:].permute(0, 2, 1)
    for blocks in code2wav.upsample:
        for block in blocks:
            waveform = block(waveform)
    for block in code2wav.decoder:
        waveform = block(waveform)
    return list(waveform.clamp(min=-1, max=1).reshape(len(rows_frames), -1).float().asnumpy())


class SpeechStream:
    """One row's speech, handed out as its frames come (`add`, then `next_span` and `take` until all is decoded)."""

    def __init__(self, code2wav, on_audio, end_code: int, first_frames: int = 4, every_frames: int = 12):
        self.code2wav, self.on_audio, self.end_code = code2wav, on_audio, end_code
        self.first_frames, self.every_frames = first_frames, every_frames
        self.frames: list = []  # one (1, groups) code tensor per frame
        self.ended = False  # the row's end code was seen: later frames are padding
        self.decoded_frames = 0  # frames whose samples were handed out
        self.sent: list[np.ndarray] = []  # the samples handed out, in order
        self.chunk_sent = 0  # of the current code2wav chunk
        self.frames_per_emission: list[int] = []  # frames each emission decoded, its context included
        self.conv_frames_per_emission: list[int] = []  # of them, the frames through code2wav's convolutions
        self.step = 0  # the talker step of the latest frame
        self.first_audio_step: Optional[int] = None
        self.first_audio_time: Optional[float] = None

    def add(self, codes, step: int) -> bool:
        """The codes (1, groups) of the row's next frame, seen at talker step `step`; whether an emission is due."""
        if self.ended:
            return False
        self.frames.append(codes)
        self.step = step
        due = self.first_frames if self.decoded_frames == 0 else self.every_frames
        return len(self.frames) - self.decoded_frames >= due

    def next_span(self) -> Optional[tuple[int, int, int]]:
        """The frames to decode next for the samples not handed out yet, one of `generate`'s code2wav chunks at a
        time: (start, conv_start, end), code2wav's transformer over [start, end), behind at most
        `STREAM_CONTEXT_FRAMES` of context, and its convolutions over [conv_start, end), behind at most
        `CONV_CONTEXT_FRAMES`; None once all are handed out."""
        if self.decoded_frames >= len(self.frames):
            return None
        chunk_start = self.decoded_frames // CHUNK_FRAMES * CHUNK_FRAMES
        chunk_end = min(chunk_start + CHUNK_FRAMES, len(self.frames))
        chunk_context = LEFT_CONTEXT_FRAMES if chunk_start - LEFT_CONTEXT_FRAMES > 0 else chunk_start
        start = max(chunk_start - chunk_context, self.decoded_frames - STREAM_CONTEXT_FRAMES)
        return start, max(start, self.decoded_frames - CONV_CONTEXT_FRAMES), chunk_end

    def take(self, samples: np.ndarray, start: int, conv_start: int, end: int) -> None:
        """Hands out what `samples`, the span's from frame `conv_start` to `end`, hold beyond what was sent. code2wav
        gives a few samples fewer than its frames' (the last upsampling trims them), so positions are counted in
        samples from the chunk's first frame on, as `chunked_decode` joins its chunks."""
        chunk_start = self.decoded_frames // CHUNK_FRAMES * CHUNK_FRAMES
        if self.decoded_frames == chunk_start:
            self.chunk_sent = 0  # samples of this chunk handed out
        into_chunk = (chunk_start - conv_start) * self.samples_per_frame
        self._send(samples[into_chunk + self.chunk_sent :])
        self.chunk_sent = len(samples) - into_chunk
        self.frames_per_emission.append(end - start)
        self.conv_frames_per_emission.append(end - conv_start)
        self.decoded_frames = end

    @property
    def samples_per_frame(self) -> int:
        return int(self.code2wav.total_upsample)

    def _send(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        if self.first_audio_step is None:
            self.first_audio_step, self.first_audio_time = self.step, time.perf_counter()
        self.sent.append(samples.astype(np.float32))
        self.on_audio(self.sent[-1])

    def finish(self, waveform: Optional[np.ndarray]) -> None:
        """What `generate` returned beyond the samples already handed out."""
        if waveform is not None:
            self._send(waveform[sum(len(piece) for piece in self.sent) :])
