"""What watches a generation (omni_helpers/generation/instruments.py): one answer's figures from the streams."""

from __future__ import annotations

from omni_helpers.generation.instruments import Instruments
from tests.measuring.test_metrics import stream_with


def test_an_answers_metrics_count_tokens_frames_and_decode_traffic():
    instruments = Instruments(model=None, tokenizer=None, speaking_rows=[0, 1], rows=2, started=0.0)
    instruments.thinker = stream_with([0.5, 1.5, 1.75, 2.0], [[5, 6], [9, 7], [9, 8]], byte_counts=[0, 100, 300, 500])
    instruments.talker = stream_with([2.0, 2.5, 3.0, 3.5, 4.0], [[1], [2], [3], [4]])
    instruments.generating, instruments.finished = 0.5, 4.5
    metrics = instruments.metrics(row=0, prompt_tokens=40, audio_seconds=0.24)
    assert metrics["thinker_new_tokens"] == 2  # its end token included, the padding after it not
    assert metrics["decoded_tokens"] == 2 and metrics["thinker_decode_tokens_per_second"] == 4.0
    assert metrics["talker_codec_frames"] == 3  # the talker's last choice never becomes a frame
    assert metrics["talker_frames_per_second"] == 1.5
    assert metrics["communicated_bytes_per_decoded_token"] == 200  # decode steps only, not the prefill's 100
    assert metrics["batch_size"] == 2 and metrics["real_time_factor"] == round(4.0 / 0.24, 3)
    assert metrics["preprocessing_seconds"] == 0.5 and metrics["time_to_first_token_seconds"] == 1.5
    assert metrics["prefill_seconds"] == 1.0 and metrics["thinker_steps"] == 3
    assert metrics["prompt_tokens"] == 40 and "first_audio_step" not in metrics  # no speech was streamed
