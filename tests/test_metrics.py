"""The timing helpers behind result.json's metrics."""

from __future__ import annotations

import time

import mindspore as ms
from mindspore import nn

from omni_helpers.metrics import ForwardTimes, StageClock, count_forwards, generation_metrics


def test_forward_times_split_prefill_from_decode_per_generate():
    times = ForwardTimes()
    for seconds in (1.0, 0.1, 0.1):
        times.record(seconds)
    times.next_generate()
    for seconds in (2.0, 0.2):
        times.record(seconds)
    assert times.prefill_seconds == 3.0 and times.decode_steps == 3
    assert abs(times.decode_seconds - 0.4) < 1e-9 and len(times.calls) == 5


class Double(nn.Cell):
    def construct(self, x):
        return x * 2


def test_count_forwards_times_each_call_and_restores_the_cell():
    cell = Double()
    with count_forwards(cell) as times:
        cell(ms.Tensor([1.0]))
        out = cell(ms.Tensor([2.0]))
    assert len(times.calls) == 2 and out.asnumpy().tolist() == [4.0]
    assert "construct" not in cell.__dict__  # the class's forward is back


def test_generation_metrics_rates():
    clock = StageClock()
    with clock("generate"):
        time.sleep(0.01)
    thinker, talker = ForwardTimes(), ForwardTimes()
    for seconds in (0.5, 0.25, 0.25):
        thinker.record(seconds)
    for seconds in (0.1, 0.1):
        talker.record(seconds)
    metrics = generation_metrics(clock, 40, thinker, talker, audio_seconds=0.16, device_target="CPU")
    assert metrics["thinker_new_tokens"] == 3 and metrics["thinker_decode_tokens_per_second"] == 4.0
    assert metrics["talker_codec_frames"] == 2 and metrics["talker_frames_per_second"] == 10.0
    assert metrics["prefill_seconds"] == 0.5 and metrics["prompt_tokens"] == 40
    assert metrics["peak_device_memory_mb"] is None and metrics["real_time_factor"] > 0
