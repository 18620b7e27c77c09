"""The figures behind every answer's metrics: streamer timings, batch totals, collective bytes."""

from __future__ import annotations

import numpy as np
import pytest

from omni_helpers.generation.streaming import StepStream
from omni_helpers.measuring.collectives import COMMUNICATION_OPS, collective_bytes, counting_collectives
from omni_helpers.measuring.metrics import combined


def stream_with(times: list[float], tokens: list[list[int]], eos: int = 9, byte_counts=None) -> StepStream:
    """A stream that saw a prompt and then `tokens` (one list per step, a token per row) at `times`."""
    stream = StepStream(rows=len(tokens[0]) if tokens else 1, eos_token_id=eos)
    stream.put(np.zeros((stream.rows, 3)))
    for step in tokens:
        stream.put(np.array(step))
    stream.times = list(times)
    stream.bytes = list(byte_counts or [0.0] * len(times))
    return stream


def test_prefill_is_the_prompt_to_the_first_token_and_decode_the_rest():
    stream = stream_with([10.0, 10.5, 10.75, 11.0], [[1], [2], [3]])
    assert stream.steps == 3 and stream.prefill_seconds == 0.5 and stream.decode_seconds == 0.5
    assert stream.tokens == [[1, 2, 3]]


def test_rows_stop_collecting_at_their_end_token():
    stream = stream_with([0, 1, 2, 3], [[4, 9], [9, 9], [9, 9]])  # row 1 ends at once; row 0 at step 2
    assert stream.tokens == [[4, 9], [9]] and stream.finished == [True, True]


def test_batch_times_are_counted_once_per_batch():
    row = {
        "prompt_tokens": 10,
        "thinker_new_tokens": 4,
        "decoded_tokens": 3,
        "talker_codec_frames": 0,
        "audio_seconds": 0.0,
        "preprocessing_seconds": 1.0,
        "generate_seconds": 2.0,
        "prefill_seconds": 0.5,
        "decode_seconds": 1.5,
        "batch_size": 2,
    }
    alone = dict(row, batch_size=1, generate_seconds=1.0, decode_seconds=0.75, decoded_tokens=3)
    total = combined([row, row, alone])  # a batch of two, then one alone
    assert total["requests"] == 3 and total["prompt_tokens"] == 30 and total["decoded_tokens"] == 9
    assert total["generate_seconds"] == 3.0 and total["decode_seconds"] == 2.25
    assert total["thinker_decode_tokens_per_second"] == 4.0


def test_collective_bytes_follow_the_ring_algorithms():
    # all-gather: every rank passes on the N-1 shards it does not own and receives as many
    assert collective_bytes("all_gather", 100, world_size=2) == 200 and collective_bytes("all_gather", 100, 4) == 600
    # all-reduce: reduce-scatter then all-gather, 2(N-1)/N of the buffer each way
    assert collective_bytes("all_reduce", 100, world_size=2) == 200 and collective_bytes("all_reduce", 100, 4) == 300
    with pytest.raises(ValueError):
        collective_bytes("broadcast", 1, 2)


def test_collective_counters_are_installed_only_inside_the_block():
    import importlib

    comm_ops = importlib.import_module(COMMUNICATION_OPS)
    before = comm_ops.AllReduce.__call__, comm_ops.AllGather.__call__
    with counting_collectives() as traffic:
        assert comm_ops.AllReduce.__call__ is not before[0] and traffic.bytes == 0.0
    assert (comm_ops.AllReduce.__call__, comm_ops.AllGather.__call__) == before
