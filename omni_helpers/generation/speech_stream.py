"""Speech handed out while the talker is still speaking, each row of a batch its own.

mindone's `generate` decodes the talker's codec frames with code2wav only after the talker
has finished. A forward hook on the talker (`SpeechStreams.hook`, installed for one `generate`
call) sees each frame's codes, one per row, as the next step begins, and every few frames each
row's `SpeechStream` decodes what there is of its current code2wav chunk, handing out the
samples not handed out yet. A row of a batch ends at its end code while the others go on (the
loop gives it padding from there): its stream stops at that code, read once per emission.

Each emission decodes only the frames not handed out yet, behind a fixed left context of
`STREAM_CONTEXT_FRAMES`, so its cost stays the same however long the answer grows; within
each of `generate`'s 300-frame code2wav chunks the context reaches back no further than that
chunk's own (25 frames before it, as mindone's `chunked_decode` decodes it). code2wav is causal:
a sample depends on the frames before it, through its attention layers' 72-frame windows. With
one layer (the tiny checkpoint) 100 frames of context give `generate`'s own samples (measured:
3.0e-5 at most; 72 frames: 0.11). The released code2wav has 8 such layers, so frames further back
than 100 can still add a little: less than `chunked_decode` itself leaves out at each chunk's
start, where it keeps 25. The tail that the last decode leaves is taken from `generate`'s own
waveform.

Every msrun rank installs the same hook, so under ZeRO-3 code2wav's collectives stay in step.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import numpy as np

from omni_helpers.mindone_changes.batched_speech import CHUNK_FRAMES, LEFT_CONTEXT_FRAMES  # generate's chunks

SPEECH_SAMPLE_RATE = 24000  # code2wav's output rate
STREAM_CONTEXT_FRAMES = 100  # frames decoded again before the new ones at each emission (see above)

# on_audio(row, samples): float32 samples in [-1, 1], 24 kHz mono, each row's in order.
AudioCallback = Callable[[int, np.ndarray], None]


class SpeechStreams:
    """The talker hook of a generation that streams speech: each frame's codes to each row's `SpeechStream`."""

    def __init__(self, code2wav, on_audio: AudioCallback, rows: int, end_code: int, **cadence):
        self.rows = [
            SpeechStream(code2wav, functools.partial(on_audio, row), end_code, **cadence) for row in range(rows)
        ]
        self.steps = 0  # talker forwards seen

    def hook(self, cell, inputs, outputs) -> None:
        """Forward hook on the talker: the codes (rows, groups) of the frame before this step (none at the prefill)."""
        self.steps += 1
        codes = outputs.hidden_states[-1]
        if codes is None:
            return
        for row, stream in enumerate(self.rows):
            stream.add(codes if len(self.rows) == 1 else codes[row : row + 1], self.steps)

    def finish(self, waveforms: list) -> None:
        for stream, waveform in zip(self.rows, waveforms):
            stream.finish(waveform)


class SpeechStream:
    """One row's speech, handed out as its frames come (`add`)."""

    def __init__(self, code2wav, on_audio, end_code: int, first_frames: int = 4, every_frames: int = 12):
        self.code2wav, self.on_audio, self.end_code = code2wav, on_audio, end_code
        self.first_frames, self.every_frames = first_frames, every_frames
        self.frames: list = []  # one (1, groups) code tensor per frame
        self.ended = False  # the row's end code was seen: later frames are padding
        self.decoded_frames = 0  # frames whose samples were handed out
        self.sent_samples = 0  # of the whole waveform
        self.chunk_sent = 0  # of the current code2wav chunk
        self.frames_per_emission: list[int] = []  # frames each emission decoded, its context included
        self.step = 0  # the talker step of the latest frame
        self.first_audio_step: Optional[int] = None
        self.first_audio_time: Optional[float] = None

    def add(self, codes, step: int) -> None:
        """The codes (1, groups) of the row's next frame, seen at talker step `step`."""
        if self.ended:
            return
        self.frames.append(codes)
        self.step = step
        due = self.first_frames if self.decoded_frames == 0 else self.every_frames
        if len(self.frames) - self.decoded_frames >= due:
            self._end_at_end_code()
            self._decode_so_far()

    def _end_at_end_code(self) -> None:
        """Drops the frames from the row's end code on (one read of the new frames' first codes)."""
        from mindspore import mint

        firsts = mint.cat([codes[:, 0] for codes in self.frames[self.decoded_frames :]]).asnumpy()
        if (firsts == self.end_code).any():
            self.frames = self.frames[: self.decoded_frames + int(np.argmax(firsts == self.end_code))]
            self.ended = True

    def _decode_so_far(self) -> None:
        """The samples not handed out yet, one of `generate`'s code2wav chunks at a time. code2wav gives a few
        samples fewer than its frames' (the last upsampling trims them), so positions are counted in samples
        from the chunk's first frame on, as `chunked_decode` joins its chunks."""
        frames = len(self.frames)
        while self.decoded_frames < frames:
            chunk_start = self.decoded_frames // CHUNK_FRAMES * CHUNK_FRAMES
            chunk_end = min(chunk_start + CHUNK_FRAMES, frames)
            if self.decoded_frames == chunk_start:
                self.chunk_sent = 0  # samples of this chunk handed out
            chunk_context = LEFT_CONTEXT_FRAMES if chunk_start - LEFT_CONTEXT_FRAMES > 0 else chunk_start
            start = max(chunk_start - chunk_context, self.decoded_frames - STREAM_CONTEXT_FRAMES)
            samples = self._decode(start, chunk_end)  # from frame `start` on
            self._send(samples[(chunk_start - start) * self.samples_per_frame + self.chunk_sent :])
            self.chunk_sent = len(samples) - (chunk_start - start) * self.samples_per_frame
            self.frames_per_emission.append(chunk_end - start)
            self.decoded_frames = chunk_end

    @property
    def samples_per_frame(self) -> int:
        return int(self.code2wav.total_upsample)

    def _decode(self, start: int, end: int) -> np.ndarray:
        """Samples of frames [start, end), decoded from frame `start` on."""
        from mindspore import mint

        codes = mint.stack(self.frames[start:end], dim=1).transpose(1, 2)  # (1, groups, frames)
        return self.code2wav(codes).reshape(-1).float().asnumpy()

    def _send(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        if self.first_audio_step is None:
            self.first_audio_step, self.first_audio_time = self.step, time.perf_counter()
        self.sent_samples += len(samples)
        self.on_audio(samples.astype(np.float32))

    def finish(self, waveform: Optional[np.ndarray]) -> None:
        """What `generate` returned beyond the samples already handed out."""
        if waveform is not None:
            self._send(waveform[self.sent_samples :])
