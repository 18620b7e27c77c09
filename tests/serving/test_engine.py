"""How the engine forms its batches (omni_helpers/serving/engine.py: Engine.batch_with), without a model:
requests are queued from other threads as an HTTP handler queues them."""

from __future__ import annotations

import threading
import time

import pytest

from omni_helpers.request.checkpoint import resolve_checkpoint
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.serving.engine import Deferred, Engine, Job, batch_settings, can_share, padding_rows

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


def just_ended(engine, expected: int) -> None:
    """As a generation leaves the engine: `expected` requests waiting or about to ask again."""
    engine.expected, engine.ended = expected, time.perf_counter()


def test_a_batch_waits_for_the_requests_the_last_generation_left_waiting_and_answered(engine):
    just_ended(engine, 3)  # e.g. one waited through it, and it answered two clients who ask again
    late = submit_later(engine, [0.2, 0.4, 0.6])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 3 and waited < 2.0  # the third came at 0.6 s: the batch did not wait out its window
    assert [job.conversation[0]["content"][0]["text"] for job in batch] == ["first", "question 0", "question 1"]
    assert engine.waiting == 1  # the fourth waits for the next batch


def test_a_batch_after_a_lone_request_waits_for_nobody(engine):
    just_ended(engine, 1)
    late = submit_later(engine, [0.5])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 1 and waited < 0.4


def test_a_batch_waits_no_longer_than_its_window_after_the_last_end(engine):
    engine.batch_window = 0.3
    just_ended(engine, 4)
    late = submit_later(engine, [0.1, 1.5])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 2 and 0.2 < waited < 1.0


def test_a_request_to_an_idle_engine_starts_at_once(engine):
    just_ended(engine, 4)
    engine.ended -= 10.0  # long ago
    late = submit_later(engine, [0.3])
    batch, waited = first_batch(engine)
    late.join()
    assert len(batch) == 1 and waited < 0.2


def job(content, **settings) -> Job:
    return Job([{"role": "user", "content": content}], SETTINGS.replace(**settings))


SPOKEN = dict(return_audio=True, talker_max_new_tokens=16)
IMAGE = [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]
VIDEO = [{"type": "video", "video": "cat.mp4"}, {"type": "text", "text": "What is it?"}]


# ----------------------------------------------------------------------------- speech deferred (Engine.wait_before_speaking)


def deferred(engine, rows: int, since: float = 0.0) -> None:
    """As generations leave `rows` speaking rows waiting to speak, the oldest since `since` seconds ago."""
    engine.deferred = [Deferred(job("Hi", **SPOKEN), None, 0, row) for row in range(rows)]
    engine.deferred_since = time.perf_counter() - since


def test_speech_waits_for_the_clients_answered_in_text_within_both_windows(engine):
    engine.batch_window, engine.speech_window = 0.2, 0.4
    just_ended(engine, 2)  # two rows were answered in text: their clients ask again
    deferred(engine, 2)
    assert 0.15 < engine.wait_before_speaking() <= 0.2  # until the window for those clients ends
    deferred(engine, 2, since=0.35)
    assert 0 < engine.wait_before_speaking() <= 0.05  # the speech window ends first


def test_speech_waits_for_nobody_when_nobody_is_expected(engine):
    engine.speech_window = 0.4
    just_ended(engine, 0)
    deferred(engine, 2)
    assert engine.wait_before_speaking() == 0.0  # a request that waits already is still thought for first


def test_speech_waits_no_longer_than_its_window_nor_once_a_batch_is_full(engine):
    engine.speech_window = 0.4
    just_ended(engine, 3)
    deferred(engine, 8)  # --max_batch_size rows wait
    assert engine.wait_before_speaking() is None
    deferred(engine, 2, since=0.5)
    assert engine.wait_before_speaking() is None


def test_rows_with_and_without_speech_share_a_batch_whose_speakers_agree():
    batch = [job("Hi", **SPOKEN), job("Hello")]
    assert can_share(batch, job(IMAGE)) and can_share(batch, job(IMAGE, **SPOKEN))
    assert not can_share(batch, job("Hi", **{**SPOKEN, "talker_max_new_tokens": 32}))  # another talker setting
    assert not can_share(batch, job("Hi", max_new_tokens=4))  # another thinker setting
    assert not can_share([job(IMAGE)], job(VIDEO)) and not can_share(batch, job("Hi", seed=1))
    # the settings of a row that does not speak do not matter to the talker
    assert can_share([job("Hello")], job("Hi", **SPOKEN)) and can_share([job("Hello")], job("Hey", speaker="Chelsie"))
    assert batch_settings([job("Hello"), job("Hi", **SPOKEN)]) == (SETTINGS.replace(**SPOKEN), [1], False)


@pytest.mark.parametrize(
    "rows, speaking, repeated, padded_speaking",
    [
        ("t", [], [], []),
        ("tm", [1], [], [1]),
        ("mmt", [0, 1], [2], [0, 1]),  # 3 rows -> 4, the text row repeated
        ("mmmmt", [0, 1, 2], [0, 4, 4], [0, 1, 2, 5]),  # 3 speakers -> 4: one repeated speaking, first
        ("mmmm", [0, 1, 2], [], [0, 1, 2]),  # no room: 4 rows already
        ("tttmm", [], [0, 0, 0], []),
        ("tttttttt", [0], [], [0]),
    ],
)
def test_a_batch_is_padded_to_a_power_of_two_rows_by_repeating_its_lightest_row(
    rows, speaking, repeated, padded_speaking
):
    batch = [job("Hi" if kind == "t" else IMAGE) for kind in rows]
    assert padding_rows(batch, speaking, most=8) == (repeated, padded_speaking)


def test_padding_stops_at_the_largest_batch():
    batch = [job("Hi") for _ in range(5)]
    assert padding_rows(batch, [0, 1, 2], most=5) == ([], [0, 1, 2])
    assert padding_rows(batch, [0, 1, 2], most=6) == ([0], [0, 1, 2, 5])


def test_a_batch_waits_for_a_request_still_being_checked(engine):
    """Clients asking at once: the first is queued while the second's media are still being checked."""
    checking = threading.Event()

    def second_client():
        with engine.arrival():
            checking.set()
            time.sleep(0.3)  # its media fetched and checked
            engine.submit(question("second"), SETTINGS)

    client = threading.Thread(target=second_client)
    client.start()
    checking.wait()
    batch, waited = first_batch(engine)
    client.join()
    assert len(batch) == 2 and 0.2 < waited < 2.0 and engine.arriving == 0
