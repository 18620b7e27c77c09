"""How the engine forms its batches (omni_helpers/serving/engine.py: Engine.batch_with), without a model:
requests are queued from other threads as an HTTP handler queues them."""

from __future__ import annotations

import threading
import time

import pytest

from omni_helpers.request.checkpoint import resolve_checkpoint
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.serving.engine import Engine

SETTINGS = GenerationSettings(max_new_tokens=8)


def question(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.fixture
def engine(tiny_checkpoint):
    return Engine(resolve_checkpoint(str(tiny_checkpoint)), None, SETTINGS, 8, max_batch_size=8, batch_window=5.0)


def submit_later(engine, delays: list[float]) -> threading.Thread:
    """Each delay (seconds from now): one more request, as a client that sends its next one then."""

    def send():
        start = time.monotonic()
        for i, delay in enumerate(delays):
            time.sleep(max(start + delay - time.monotonic(), 0))
            engine.submit(question(f"question {i}"), SETTINGS)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def first_batch(engine) -> tuple[list, float]:
    engine.submit(question("first"), SETTINGS)
    started = time.monotonic()
    batch = engine.batch_with(engine.next_job())
    return batch, time.monotonic() - started


def test_a_batch_waits_for_as_many_requests_as_the_last_generation_answered(engine):
    engine.answered = 3  # the clients of a 3-row generation ask again as their answers end
    late = submit_later(engine, [0.2, 0.4, 0.6])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 3 and waited < 2.0  # the third came at 0.6 s: the batch did not wait out its window
    assert [job.conversation[0]["content"][0]["text"] for job in batch] == ["first", "question 0", "question 1"]
    assert engine.waiting == 1  # the fourth waits for the next batch


def test_a_batch_after_a_lone_request_waits_for_nobody(engine):
    engine.answered = 1
    late = submit_later(engine, [0.5])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 1 and waited < 0.4


def test_a_batch_waits_no_longer_than_its_window(engine):
    engine.answered, engine.batch_window = 4, 0.3
    late = submit_later(engine, [0.1, 1.5])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 2 and 0.25 < waited < 1.0
