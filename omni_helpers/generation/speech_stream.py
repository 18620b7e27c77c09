"""Speech handed out while the talker is still speaking.

mindone's `generate` decodes the talker's codec frames with code2wav only after the talker
has finished. A forward hook on the talker (installed for one `generate` call) sees each
frame's codes as the next step begins, and every few frames decodes what there is of the
current code2wav chunk, handing out the samples not handed out yet.

code2wav is causal: decoding the first n frames of a chunk gives exactly the first samples
of decoding the whole chunk (measured: equal to 2e-5). So the pieces are the very samples
`generate` returns at the end, decoded with the same chunking (300-frame chunks, the later
ones with 25 frames of left context, as mindone's `chunked_decode` does); the tail that the
last decode leaves is taken from `generate`'s own waveform. The price: each emission decodes
the current chunk's frames so far again.

Every msrun rank installs the same hook, so under ZeRO-3 code2wav's collectives stay in step.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from omni_helpers.mindone_changes.batched_speech import CHUNK_FRAMES, LEFT_CONTEXT_FRAMES  # generate's chunks

SPEECH_SAMPLE_RATE = 24000  # code2wav's output rate

# on_audio(samples): float32 samples in [-1, 1], 24 kHz mono, in order.
AudioCallback = Callable[[np.ndarray], None]


class SpeechStream:
    def __init__(self, code2wav, on_audio: AudioCallback, first_frames: int = 4, every_frames: int = 12):
        self.code2wav, self.on_audio = code2wav, on_audio
        self.first_frames, self.every_frames = first_frames, every_frames
        self.frames: list = []  # one (1, groups) code tensor per frame
        self.decoded_frames = 0
        self.chunk_start = 0  # first frame of the code2wav chunk being handed out
        self.sent_in_chunk = 0  # samples of that chunk handed out
        self.sent_samples = 0  # of the whole waveform
        self.steps = 0  # talker forwards seen
        self.first_audio_step: Optional[int] = None
        self.first_audio_time: Optional[float] = None

    def hook(self, cell, inputs, outputs) -> None:
        """Forward hook on the talker: the codes of the frame before this step (none at the prefill)."""
        self.steps += 1
        codes = outputs.hidden_states[-1]
        if codes is None:
            return
        self.frames.append(codes)
        due = self.first_frames if self.decoded_frames == 0 else self.every_frames
        if len(self.frames) - self.decoded_frames >= due:
            self._decode_so_far()

    def _decode_so_far(self) -> None:
        frames = len(self.frames)
        while True:
            chunk_end = min(self.chunk_start + CHUNK_FRAMES, frames)
            wav = self._decode(self.chunk_start, chunk_end)
            self._send(wav[self.sent_in_chunk :])
            self.sent_in_chunk = len(wav)
            if chunk_end - self.chunk_start < CHUNK_FRAMES or chunk_end == frames:
                break
            self.chunk_start, self.sent_in_chunk = chunk_end, 0  # that chunk is whole: on to the next
        self.decoded_frames = frames

    def _decode(self, start: int, end: int) -> np.ndarray:
        """Samples of frames [start, end) as chunked_decode computes them for the chunk starting at `start`."""
        from mindspore import mint

        context = LEFT_CONTEXT_FRAMES if start - LEFT_CONTEXT_FRAMES > 0 else start
        codes = mint.stack(self.frames[start - context : end], dim=1).transpose(1, 2)  # (1, groups, frames)
        wav = self.code2wav(codes).reshape(-1).float().asnumpy()
        return wav[context * int(self.code2wav.total_upsample) :]

    def _send(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        if self.first_audio_step is None:
            self.first_audio_step, self.first_audio_time = self.steps, time.perf_counter()
        self.sent_samples += len(samples)
        self.on_audio(samples.astype(np.float32))

    def finish(self, waveform: Optional[np.ndarray]) -> None:
        """What `generate` returned beyond the samples already handed out."""
        if waveform is not None:
            self._send(waveform[self.sent_samples :])
