"""The timing helpers behind result.json's metrics."""

from __future__ import annotations

import time

import mindspore as ms
from mindspore import nn

from omni_helpers.metrics import ForwardTimes, StageClock, collective_bytes, count_forwards, generation_metrics
from omni_helpers.runtime import Runtime


def test_forward_times_split_prefill_from_decode_per_generate():
    times = ForwardTimes()
    for seconds in (1.0, 0.1, 0.1):
        times.record(seconds)
    times.next_generate()
    for seconds in (2.0, 0.2):
        times.record(seconds)
    assert times.prefill_seconds == 3.0 and times.decode_steps == 3
    assert abs(times.decode_seconds - 0.4) < 1e-9 and len(times.calls) == 5


def test_forward_times_count_only_the_decode_steps_bytes():
    times = ForwardTimes()
    for seconds, sent_and_received in ((1.0, 5000.0), (0.1, 100.0), (0.1, 100.0)):
        times.record(seconds, sent_and_received)
    assert times.decode_bytes == 200.0 and times.decode_steps == 2


def test_collective_bytes_follow_the_ring_algorithms():
    # all-gather: every rank passes on the N-1 shards it does not own and receives as many
    assert collective_bytes("all_gather", 100, world_size=2) == 200 and collective_bytes("all_gather", 100, 4) == 600
    # all-reduce: reduce-scatter then all-gather, 2(N-1)/N of the buffer each way
    assert collective_bytes("all_reduce", 100, world_size=2) == 200 and collective_bytes("all_reduce", 100, 4) == 300


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
    model = nn.Dense(3, 2)  # 8 float32 parameters
    metrics = generation_metrics(clock, 40, thinker, talker, audio_seconds=0.16, runtime=Runtime("CPU"), model=model)
    assert metrics["thinker_new_tokens"] == 3 and metrics["thinker_decode_tokens_per_second"] == 4.0
    assert metrics["talker_codec_frames"] == 2 and metrics["talker_frames_per_second"] == 10.0
    assert metrics["prefill_seconds"] == 0.5 and metrics["prompt_tokens"] == 40
    assert metrics["peak_device_memory_mb"] is None and metrics["real_time_factor"] > 0
    assert (metrics["parallel"], metrics["world_size"], metrics["parameter_bytes"]) == ("none", 1, 32)
    assert metrics["communicated_bytes_per_decoded_token"] == 0
