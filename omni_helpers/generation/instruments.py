"""What watches one generation without changing it, handed to the core as one object: the collective-byte
counter, the thinker's and talker's step streams (timing, tokens, streamed text), streamed speech, the
forward taps that time a stage when nothing is streamed, and the caller's thread kept on its own core.

    with Instruments(model, tokenizer, speaking_rows, rows, on_text, on_audio, started) as watch:
        result, speech = model.generate(**inputs, **keywords(..., watch.text_streamer))
    watch.finish(new_tokens, waveforms)
    metrics = watch.metrics(row, prompt_tokens, audio_seconds)
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Optional

import numpy as np

from omni_helpers.generation.speech_stream import AudioCallback, SpeechStreams
from omni_helpers.generation.streaming import StepStream, TextCallback
from omni_helpers.measuring.collectives import counting_collectives
from omni_helpers.measuring.forward_taps import listen
from omni_helpers.measuring.metrics import rate
from omni_helpers.runtime import caller_on_its_own_core


class Instruments:
    def __init__(
        self,
        model,
        tokenizer,
        speaking_rows: list[int],
        rows: int,
        on_text: Optional[TextCallback] = None,
        on_audio: Optional[AudioCallback] = None,
        started: Optional[float] = None,
    ):
        self.model, self.tokenizer, self.speaking_rows, self.rows = model, tokenizer, list(speaking_rows), rows
        self.on_text, self.on_audio = on_text, on_audio
        self.started = time.perf_counter() if started is None else started
        self.generating = self.finished = None
        self.thinker = self.talker = self.speech = None
        self._exits = contextlib.ExitStack()

    @property
    def text_streamer(self) -> Optional[StepStream]:
        """The thinker's streamer for `generate`, only when text is streamed (it costs a host read per step)."""
        return self.thinker if self.on_text else None

    def __enter__(self) -> "Instruments":
        self.generating = time.perf_counter()
        traffic = self._exits.enter_context(counting_collectives())
        self.thinker = StepStream(self.rows, self.model.config.im_end_token_id, traffic, self.tokenizer, self.on_text)
        self.talker = StepStream(1, traffic=traffic)
        hooks = [] if self.on_text else self.thinker.watch(self.model.thinker)  # timed by its forwards instead
        if self.speaking_rows:
            hooks += self.talker.watch(self.model.talker)
            if self.on_audio:  # the talker's rows are the speaking rows, in order
                end_code = self.model.config.talker_config.codec_eos_token_id
                on_audio = lambda talker_row, samples: self.on_audio(self.speaking_rows[talker_row], samples)
                self.speech = SpeechStreams(self.model.code2wav, on_audio, len(self.speaking_rows), end_code)
                hooks += listen(self.model.talker, after=self.speech.hook)
                self._exits.enter_context(self.speech.answering_whole_decode())
        self._exits.callback(lambda: [hook.remove() for hook in hooks])
        self._exits.enter_context(caller_on_its_own_core())  # CPU: MindSpore's spinning threads kept off its core
        return self

    def __exit__(self, *exception) -> None:
        self._exits.close()

    def finish(self, new_tokens: np.ndarray, waveforms: list[Optional[np.ndarray]]) -> None:
        """After `generate`: each row's tokens up to its end token (however the steps were watched), and each
        row's streamed speech's last samples; the generation's time ends here."""
        self.thinker.take_tokens(new_tokens)
        if self.speech:
            self.speech.finish([waveforms[row] for row in self.speaking_rows])
        self.finished = time.perf_counter()

    def metrics(
        self, row: int, prompt_tokens: int, audio_seconds: float, finished: Optional[float] = None
    ) -> dict[str, Any]:
        """One answer's figures (`finished`: when the row's answer was done, if before the generation's end). Decode
        rates are per row: a batch of B rows decodes B times as many tokens."""
        thinker, talker = self.thinker, self.talker
        generate_seconds = (finished or self.finished) - self.generating
        decoded = max(thinker.steps - 1, 0)  # steps after the first token
        speaks = row in self.speaking_rows
        frames = max(talker.steps - 1, 0) if speaks else 0  # the talker's last choice never becomes a frame
        first_token = (thinker.times[1] - self.started) if len(thinker.times) > 1 else None
        figures = {
            "prompt_tokens": prompt_tokens,
            "batch_size": thinker.rows,
            "preprocessing_seconds": round(self.generating - self.started, 3),
            "generate_seconds": round(generate_seconds, 3),
            "time_to_first_token_seconds": None if first_token is None else round(first_token, 3),
            "prefill_seconds": round(thinker.prefill_seconds, 4),  # tens of milliseconds: kept to 0.1 ms
            "thinker_new_tokens": len(thinker.tokens[row]),
            "decoded_tokens": decoded,
            "decode_seconds": round(thinker.decode_seconds, 3),
            "thinker_decode_tokens_per_second": rate(decoded, thinker.decode_seconds),
            "talker_codec_frames": frames,
            "talker_frames_per_second": rate(frames, talker.seconds),
            "audio_seconds": round(audio_seconds, 3),
            "real_time_factor": round(generate_seconds / audio_seconds, 3) if audio_seconds else None,
            "communicated_bytes_per_decoded_token": round(thinker.decode_bytes / decoded) if decoded else None,
            "thinker_steps": thinker.steps,
            "first_text_step": thinker.first_piece_step,
        }
        if self.speech is not None and speaks:  # when the row's first text and speech went out, in steps and seconds
            stream = self.speech.rows[self.speaking_rows.index(row)]
            first_audio = stream.first_audio_time
            figures.update(
                talker_steps=self.speech.steps,
                first_audio_step=stream.first_audio_step,
                time_to_first_audio_seconds=None if first_audio is None else round(first_audio - self.started, 3),
            )
        return figures
