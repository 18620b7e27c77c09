"""A resident Qwen3-Omni: the model loaded once, the requests waiting when a generation starts
answered together, as the rows of one batch.

Rank 0 runs the `Engine`: the HTTP API and the browser UI submit jobs from their own
threads; the engine takes them in the main thread (where MindSpore runs): the oldest waiting
job and, up to --max_batch_size, the later waiting ones that can share its forward
(`can_share`), preprocesses them as one batch (template, media, processor), sends it to the
other ranks (`lockstep`) and generates. Every other rank runs `follow`: the same generations,
as rank 0 sends them. What a job produces (its own row's text pieces and speech chunks, the
answer, or its error) arrives on its own queue of events.

Batches are formed when a generation starts, not joined while one decodes (static batching):
the loop's compiled steps and KV buffers have the batch's shape for the whole generation. The
clients a generation answered send their next requests a few milliseconds after it ends, so the
next batch waits, up to --batch_window_ms after that end, for them and for those who were waiting
already; and a batch waits as long for requests still on their way in when it would start (clients
asking at once). A batch is padded to 1, 2, 4 or 8 rows by repeating one of its rows (`padding_rows`), so
that the server compiles its graphs for a few shapes, once.
Greedy rows answer as they would alone (the prompts are left-padded and masked); a request
with a seed runs alone, since its draws are reproducible only alone. Rows with and without speech
share the thinker's forward; the talker and code2wav run over the rows that speak, which share
their speech settings and stream their speech all or none (code2wav runs as the talker goes).

Speech waits for the batches that follow (--speech_window_ms): a speech chain (the talker's
frames, each with its code predictor's steps, then code2wav) costs a batch of rows little more than
one row, and several times a thinker pass. So a batch's speaking rows keep their thinker states
(`Answer.held`) once their text is done, while the clients answered in text ask again and their
requests are thought for, and the speaking rows of those batches speak with them as one talker
batch (`speak_deferred`): once nobody more is expected, --max_batch_size rows wait, or the window
since the oldest's text has passed. A lone request waits for nothing. Every rank keeps the same
rows (`follow`) and speaks them when rank 0 says so.

Admission comes before allocation: a request's tokens and frames are checked against the
server's ceilings (its --max_new_tokens and --talker_max_new_tokens) and the model's context
when it is submitted, and again with its prompt's length once the processor has run, before
anything is sent to a rank or allocated. A job whose client went away or pressed Stop is
cancelled (`Job.cancel`): skipped if it still waits; if it runs, its row goes on silently with
the others (nothing more is sent for it), and the batch stops at its next decoding step on
every rank once every row's client has gone. A fault inside a generation (the device out of
memory, say) fails that batch alone in one process; under msrun the other ranks may be waiting
inside a collective, so the server ends and msrun stops them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from omni_helpers.generation.core import Answer, generate_from_inputs, prepare_inputs, speak_held
from omni_helpers.request.cancellation import Cancellation
from omni_helpers.request.checkpoint import Checkpoint
from omni_helpers.request.conversation import Conversation
from omni_helpers.request.errors import Cancelled, RequestError
from omni_helpers.request.request_files import Request
from omni_helpers.request.settings import FLAG_NAMES, GenerationSettings
from omni_helpers.request.validation import (
    Context,
    RequestLimits,
    check_context,
    check_request_seconds,
    check_request_size,
    check_requests,
    check_server_limits,
    check_settings,
    media_items,
    visual_kinds,
)
from omni_helpers.serving.lockstep import IDLE, STOP, Lockstep

HEARTBEAT_SECONDS = 5  # an idle rank 0 tells the others so this often: a rank waiting in a collective
# times out (after 30 s with MindSpore's mccl on CPU; HCCL_EXEC_TIMEOUT, 30 min by default, on Ascend)


class QueueFull(Exception):
    """More requests are waiting than --max_queue allows (HTTP 429)."""


class NotReady(Exception):
    """The model is still loading (HTTP 503)."""


class GenerationFailed(Exception):
    """A fault inside a generation, not a bad request (HTTP 500): its message says what happened."""


@dataclass
class Job:
    conversation: Conversation
    settings: GenerationSettings
    names: dict[str, str] = field(default_factory=lambda: FLAG_NAMES)  # how the caller spells each setting
    stream_audio: bool = False  # hand speech out as the talker speaks (else only the whole waveform)
    submitted: float = field(default_factory=time.perf_counter)
    cancellation: Cancellation = field(default_factory=Cancellation)
    # ("started", None), ("text", str), ("audio", samples), then ("done", Answer), ("error", exception) or
    # ("cancelled", None)
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)

    def cancel(self) -> None:
        """Nobody waits for the answer any more: skip the job, or stop sending it anything."""
        self.cancellation.cancel()

    def send(self, kind: str, value: Any = None) -> None:
        """An event for the client, unless it has gone."""
        if not self.cancellation.cancelled:
            self.events.put((kind, value))


def can_share(batch: list[Job], job: Job) -> bool:
    """Whether `job` can be a row of `batch`'s forward: the same thinker settings, no seed (draws reproducible only
    alone), and not images beside videos (a forward takes one kind). Rows with and without speech share the
    thinker; the rows that speak share the talker, so they need the same speech settings, streamed for all or none."""
    first = batch[0]
    if job.settings.without_speech() != first.settings.without_speech() or job.settings.seed is not None:
        return False
    speaker = next((other for other in batch if other.settings.return_audio), None)
    if job.settings.return_audio and speaker is not None:
        if job.settings != speaker.settings or job.stream_audio != speaker.stream_audio:
            return False
    kinds = set().union(*(visual_kinds(other.conversation) for other in batch))
    return len(kinds | visual_kinds(job.conversation)) < 2


def padding_rows(batch: list[Job], speaking_rows: list[int], most: int) -> tuple[list[int], list[int]]:
    """The rows to repeat after a batch's own so that its forward has 1, 2, 4, 8... rows (at most `most`), speaking
    rows first so that the talker's come to 1, 2, 4... too where there is room: each compiled graph is kept per shape, so a server
    sees a few shapes, compiled once, where it would otherwise compile one for every batch size it meets (about
    0.5 s each on the tiny checkpoint here, seconds at full size). A repeated row answers as its original does
    and ends when it does, so it never holds the batch longer; the one with the fewest media is repeated.
    Returns the rows repeated, in order after the batch's, and the padded batch's speaking rows."""

    def bucket(count: int) -> int:
        return min(1 << (count - 1).bit_length(), most) if count else 0

    def lightest(rows) -> int:
        return min(rows, key=lambda row: len(list(media_items(batch[row].conversation))))

    room = bucket(len(batch)) - len(batch)
    speakers = min(bucket(len(speaking_rows)) - len(speaking_rows), room)  # repeated speaking, the talker's rows
    repeated = [lightest(speaking_rows)] * speakers if speakers > 0 else []
    speaking_rows = speaking_rows + list(range(len(batch), len(batch) + len(repeated)))
    return repeated + [lightest(range(len(batch)))] * (room - len(repeated)), speaking_rows


class Deferred(NamedTuple):
    """A row whose text is answered and whose speech waits (`Engine.deferred`): every rank keeps its thinker states
    under (generation, row)."""

    job: Job
    answer: Answer
    generation: int
    row: int


def can_speak_with(waiting: Job, job: Job) -> bool:
    """Whether `job`'s speech can be spoken in one talker batch with that of `waiting` (a row whose speech waits):
    the same settings, streamed for both or neither (as `can_share` asks of a batch's speaking rows)."""
    return job.settings == waiting.settings and job.stream_audio == waiting.stream_audio


def to_clients(batch: list[Job], kind: str):
    """A row's streamed pieces of `kind` to its client; a repeated row's (past the batch's own) to nobody."""

    def send(row: int, value) -> None:
        if row < len(batch):
            batch[row].send(kind, value)

    return send


def batch_settings(batch: list[Job]) -> tuple[GenerationSettings, list[int], bool]:
    """A batch's settings (a speaking row's, when any row speaks), the rows that speak, and whether they stream."""
    speaking = [row for row, job in enumerate(batch) if job.settings.return_audio]
    speaker = batch[speaking[0]] if speaking else batch[0]
    return speaker.settings, speaking, speaker.stream_audio and bool(speaking)


class BatchCancellation(Cancellation):
    """A batch's cancellation: set once every row's own is (the rows of clients that left go on silently)."""

    def __init__(self, jobs: list[Job]):
        super().__init__()
        self.jobs = jobs

    @property
    def cancelled(self) -> bool:
        return all(job.cancellation.cancelled for job in self.jobs)


def fault_message(error: BaseException) -> str:
    """What a client is told of a fault inside its generation, in one line."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, MemoryError) or "Allocate memory failed" in text or "Out of memory" in text:
        return (
            f"the device ran out of memory during this request ({first}); ask for fewer tokens, "
            "smaller or fewer media, or no speech"
        )
    return f"the generation failed ({type(error).__name__}: {first})"


class Arrival:
    """A request counted in `Engine.arriving` from `__enter__` until `end` (at the latest, `__exit__`)."""

    def __init__(self, engine: "Engine"):
        self.engine, self.counted = engine, False

    def __enter__(self) -> "Arrival":
        with self.engine.lock:
            self.engine.arriving += 1
            self.counted = True
        return self

    def end(self) -> None:
        with self.engine.lock:
            if self.counted:
                self.engine.arriving -= 1
                self.counted = False

    def __exit__(self, *exception) -> None:
        self.end()


class Engine:
    """Made before the model loads (the HTTP server answers meanwhile, `ready` false); `attach` hands it the model."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        lockstep: Lockstep,
        limits: GenerationSettings,
        max_queue: int,
        request_limits: RequestLimits = RequestLimits(),
        max_batch_size: int = 8,
        batch_window: float = 0.0,
        speech_window: float = 0.0,
    ):
        self.checkpoint, self.lockstep, self.limits, self.max_queue = checkpoint, lockstep, limits, max_queue
        self.max_batch_size = max_batch_size  # rows of one generation at most
        # seconds after a generation's end that the next batch may wait for the requests it expects
        self.batch_window = batch_window
        # seconds a batch's speaking rows may wait, once their text is done, for later batches' to speak with them
        self.speech_window = speech_window
        self.deferred: list[Deferred] = []  # rows whose text is answered, their speech still to come
        self.deferred_since = 0.0  # when the oldest of them had its text (time.perf_counter)
        self.expected = 0  # requests waiting when the last generation ended, plus the clients it answered
        self.ended = 0.0  # when the last generation ended (time.perf_counter, as `Job.submitted`)
        self.arriving = 0  # requests on their way in (read, decoded, checked), about to be queued
        self.request_limits = request_limits  # what one request may hold: media seconds and items, turns
        self.context = Context.of(checkpoint.config)
        self.model = self.processor = None
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.held: "collections.deque[Optional[Job]]" = collections.deque()  # taken from `jobs`, not yet batched
        self.lock = threading.Lock()
        self.waiting = 0
        self.queued = 0  # requests queued since the start (the clients answered early come back during a generation)
        self.busy = False
        self.served = self.cancelled = self.failed = 0
        self.batches = self.largest_batch = 0
        self.loads = 0

    def attach(self, model, processor) -> None:
        self.model, self.processor = model, processor
        self.loads += 1

    @property
    def ready(self) -> bool:
        return self.model is not None

    def submit(
        self,
        conversation: Conversation,
        settings: GenerationSettings,
        stream_audio: bool = False,
        names: dict[str, str] = FLAG_NAMES,
    ) -> Job:
        """Queue a checked request; raises QueueFull past --max_queue waiting requests."""
        with self.lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(
                    f"{self.waiting} requests are waiting already (--max_queue {self.max_queue}); try again shortly"
                )
            self.waiting += 1
            self.queued += 1
        job = Job(conversation, settings, names, stream_audio)
        self.jobs.put(job)
        return job

    def check_and_submit(
        self,
        conversation: Conversation,
        settings: GenerationSettings,
        media_folder: Path,
        names: dict[str, str],
        stream_audio: bool = False,
        arrival: Optional[Arrival] = None,
    ) -> Job:
        """Check a request against the checkpoint and the server's limits (`names`: how the caller spells each
        setting), fetch and decode its media into `media_folder`, and queue it. `arrival`: the caller's, counted
        since the request's first byte (else it counts from here). Raises RequestError, QueueFull or NotReady."""
        if not self.ready:
            raise NotReady('the model is still loading; try again when GET /health says "ready": true')
        check_server_limits(settings, self.limits, names)
        check_settings(settings, self.checkpoint, names=names)
        check_request_size(conversation, self.request_limits)  # before anything is fetched
        with self.arrival() if arrival is None else contextlib.nullcontext(arrival) as arriving:
            (request,) = check_requests([Request("request", conversation)], self.checkpoint, settings, media_folder)
            check_request_seconds(request.media_seconds, self.request_limits)
            arriving.end()  # before it is queued: a batch that takes it must not wait for it
            return self.submit(request.conversation, settings, stream_audio, names)

    def arrival(self) -> Arrival:
        """A request on its way in (its body read, its media fetched and checked): a batch about to start waits
        for it (`wait_for_more`). Ends when it is queued or refused."""
        return Arrival(self)

    def stop(self) -> None:
        """Let the engine finish the job it runs, tell the other ranks to stop, and return."""
        self.jobs.put(None)

    def serve_forever(self) -> None:
        """Rank 0's main thread: answer the waiting jobs, oldest first, in batches, until `stop`; the rows waiting to
        speak speak once no request is to be thought for first (`wait_before_speaking`)."""
        while True:
            if self.deferred:
                wait = self.wait_before_speaking()
                job = None if wait is None else self.next_job(wait=wait)
                if job is None:
                    with self.working():
                        self.speak_deferred()
                    continue
            else:
                job = self.next_job(wait=HEARTBEAT_SECONDS)
            if job is None and self.stop_seen:
                self.lockstep.send(STOP)
                return
            if job is None:
                self.lockstep.send(IDLE)  # the other ranks wait inside a broadcast: keep it short
                continue
            batch = self.batch_with(job)
            with self.working():
                self.run(batch)

    @contextlib.contextmanager
    def working(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    @property
    def stop_seen(self) -> bool:
        return bool(self.held) and self.held[0] is None

    def next_job(self, wait: Optional[float] = None) -> Optional[Job]:
        """The oldest waiting job that still has a client; None when none came within `wait` seconds (at once
        without it) or once `stop` was called (its mark is kept first in `held`)."""
        while True:
            if self.stop_seen:
                return None
            if self.held:
                job = self.held.popleft()
            else:
                try:
                    job = self.jobs.get(timeout=wait) if wait else self.jobs.get_nowait()
                except queue.Empty:
                    return None
                if job is None:
                    self.held.appendleft(None)
            if job is None:
                return None
            with self.lock:
                self.waiting -= 1
            if not job.cancellation.cancelled:
                return job
            self.cancelled += 1  # its client left while it waited
            job.events.put(("cancelled", None))

    def batch_with(self, first: Job) -> list[Job]:
        """`first` and the jobs waiting now that can share its forward, oldest first, up to --max_batch_size; the
        others keep their places, ahead of later arrivals, for the next batch. The batch waits a little for more
        (`wait_for_more`) when more are on their way."""
        batch, passed = [first], []
        while len(batch) < self.max_batch_size:
            job = self.next_job(wait=self.wait_for_more(first, len(batch) + len(passed)))
            if job is None:
                break
            (batch if can_share(batch, job) else passed).append(job)
        with self.lock:
            self.waiting += len(passed)
        stop = [self.held.popleft()] if self.stop_seen else []
        self.held.extendleft(reversed(passed))
        self.held.extendleft(stop)  # a `stop` stays first: the batch runs, then the engine stops
        return batch

    def wait_for_more(self, first: Job, taken: int) -> Optional[float]:
        """How long a batch that has taken `taken` requests may still wait for the next (None: not at all), up to
        --batch_window_ms: after a generation's end, until as many have come as were waiting then plus the clients
        it answered (they ask again as their answers end, a few milliseconds later); after `first` came, while
        other requests are on their way in (clients asking at once)."""
        deadlines = []
        if taken < self.expected:
            deadlines.append(self.ended + self.batch_window)
        if self.arriving:
            deadlines.append(first.submitted + self.batch_window)
        wait = max(deadlines, default=0.0) - time.perf_counter()
        return wait if wait > 0 else None

    def wait_before_speaking(self) -> Optional[float]:
        """How long the rows waiting to speak may still wait for a request to think for first (None: speak now; 0:
        take one that waits, if any): while requests are expected (the clients answered last, or requests on their
        way in, as `wait_for_more` waits for them), up to --speech_window_ms after the oldest of the rows had its
        text, and while fewer than --max_batch_size rows wait."""
        now, last = time.perf_counter(), self.deferred_since + self.speech_window
        if len(self.deferred) >= self.max_batch_size or now >= last:
            return None
        expecting = self.expected > 0 or self.arriving
        return max(0.0, min(self.ended + self.batch_window if expecting else now, last) - now)

    def run(self, batch: list[Job]) -> None:
        """One generation for the batch's rows. A request the checks refuse once the prompts are known fails alone:
        the others run without it. With --speech_window_ms, the speaking rows' speech waits (`deferred`), to be
        spoken with later batches' in one talker batch (`speak_deferred`)."""
        settings, speaking_rows, stream_audio = batch_settings(batch)
        # a seeded request's draws are reproducible only alone: its speech does not wait for others'
        hold_speech = self.speech_window > 0 and bool(speaking_rows) and settings.seed is None
        if hold_speech and self.deferred and not can_speak_with(self.deferred[0].job, batch[speaking_rows[0]]):
            self.speak_deferred()  # those waiting have other speech settings: they speak first
        repeated, padded_speaking = padding_rows(batch, speaking_rows, self.max_batch_size)
        speaking_rows = speaking_rows if hold_speech else padded_speaking  # speech to come is padded when spoken
        conversations = [job.conversation for job in batch] + [batch[row].conversation for row in repeated]
        try:
            inputs = prepare_inputs(self.processor, conversations, settings)
            for job, row in zip(batch, inputs["attention_mask"]):
                check_context(job.settings, self.context, prompt_tokens=int(row.sum()), names=job.names)
        except RequestError as error:  # rejected on rank 0: the other ranks never hear of it
            if len(batch) == 1:
                batch[0].send("error", error)
                return
            for job in batch:  # which row it was shows when each runs alone
                self.run([job])
            return
        self.lockstep.send(
            {
                "kind": "generate",
                "settings": dataclasses.asdict(settings),
                "speaking_rows": speaking_rows,
                "stream_audio": stream_audio,
                "hold_speech": hold_speech,
                "generation": self.batches,
                "inputs": inputs,
            }
        )
        generation = self.batches
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for job in batch:
            job.send("started")
        early, queued = set(), self.queued  # the rows answered before the generation's end

        def answer_early(row: int, answer: Answer) -> None:  # a silent row, while the talker speaks for the others
            if row < len(batch):
                early.add(row)
                self.answer(batch[row], answer, len(batch), len(repeated))
                batch[row].cancel()  # it needs nothing more: once the speaking rows' clients leave, the batch stops

        def unanswered() -> list[Job]:
            return [job for row, job in enumerate(batch) if row not in early]

        try:
            answers: list[Answer] = generate_from_inputs(
                self.model,
                self.processor,
                inputs,
                settings,
                started=min(job.submitted for job in batch),
                on_text=to_clients(batch, "text"),
                on_audio=to_clients(batch, "audio") if stream_audio and not hold_speech else None,
                cancellation=BatchCancellation(batch),
                speaking_rows=speaking_rows,
                on_answer=answer_early,
                hold_speech=hold_speech,
            )
        except Cancelled as stopped:  # every rank stopped at the same step
            self.cancel_all(unanswered(), stopped)
            return
        except Exception as error:
            self.fail_all(unanswered(), error)
            return
        now = [row for row in range(len(batch)) if row not in early and answers[row].held is None]
        later = [Deferred(batch[row], answers[row], generation, row) for row in speaking_rows if answers[row].held]
        for entry in later:
            entry.answer.metrics.update(batch_size=len(batch), repeated_rows=len(repeated))
        if later and not self.deferred:
            self.deferred_since = time.perf_counter()
        self.deferred += later
        # the clients to wait for: those answered now, and those answered early that have not asked again yet
        not_back = max(0, len(early) - (self.queued - queued))
        self.expected, self.ended = self.waiting + len(now) + not_back, time.perf_counter()
        talker_rows = sum(row < len(batch) for row in speaking_rows)  # the talker's, those repeated left out
        for row in now:  # the repeated rows' answers are let go
            if answers[row].waveform is not None:
                answers[row].metrics["speech_batch_size"] = talker_rows
            self.answer(batch[row], answers[row], len(batch), len(repeated))

    def speak_deferred(self) -> None:
        """The rows waiting to speak speak, up to --max_batch_size at once (padded to 1, 2, 4 or 8 rows as a batch is),
        on every rank; the rows whose clients have gone are let go."""
        waiting, self.deferred = self.deferred, []
        gone = [entry for entry in waiting if entry.job.cancellation.cancelled]
        waiting = [entry for entry in waiting if not entry.job.cancellation.cancelled]
        for entry in gone:
            self.cancelled += 1
            entry.job.events.put(("cancelled", None))
        if gone:
            print(f"{len(gone)} request(s) let go unspoken (their clients went away)", file=sys.stderr, flush=True)
        forget = [[entry.generation, entry.row] for entry in gone]
        if not waiting:
            self.lockstep.send({"kind": "speak", "rows": [], "forget": forget})
            return
        for start in range(0, len(waiting), self.max_batch_size):
            group = waiting[start : start + self.max_batch_size]
            self.speak(group, forget if start == 0 else [])
        self.expected, self.ended = self.waiting + len(waiting), time.perf_counter()

    def speak(self, group: list[Deferred], forget: list[list[int]]) -> None:
        """One talker batch for `group` (rows that share their speech settings), each answered when spoken."""
        jobs = [entry.job for entry in group]
        settings, stream_audio = jobs[0].settings, jobs[0].stream_audio
        shortest = min(range(len(group)), key=lambda k: group[k].answer.held.states.embed.shape[0])
        repeated, _ = padding_rows(jobs, [], self.max_batch_size)
        rows = list(range(len(group))) + [shortest] * len(repeated)  # the shortest row repeated
        self.lockstep.send(
            {
                "kind": "speak",
                "settings": dataclasses.asdict(settings),
                "rows": [[group[k].generation, group[k].row] for k in rows],
                "forget": forget,
                "stream_audio": stream_audio,
            }
        )
        try:
            spoken = speak_held(
                self.model,
                self.processor,
                [group[k].answer for k in rows],
                settings,
                on_audio=to_clients(jobs, "audio") if stream_audio else None,
                cancellation=BatchCancellation(jobs),
            )
        except Cancelled as stopped:
            self.cancel_all(jobs, stopped)
            return
        except Exception as error:
            self.fail_all(jobs, error)
            return
        for job, answer in zip(jobs, spoken):
            answer.metrics["speech_batch_size"] = len(group)
            self.answer(job, answer, answer.metrics["batch_size"], answer.metrics["repeated_rows"])

    def cancel_all(self, jobs: list[Job], stopped: Cancelled) -> None:
        """Every rank stopped at the same step: the jobs' clients had all gone."""
        self.cancelled += len(jobs)
        print(f"a request was {stopped} (its client went away or pressed Stop)", file=sys.stderr, flush=True)
        for job in jobs:
            job.events.put(("cancelled", None))

    def fail_all(self, jobs: list[Job], error: Exception) -> None:
        """A fault inside a generation fails its jobs; under msrun the server ends (the other ranks may be inside a
        collective, msrun stops them)."""
        self.failed += len(jobs)
        for job in jobs:
            job.events.put(("error", GenerationFailed(fault_message(error))))
        if self.lockstep.runtime.distributed:
            raise error
        traceback.print_exception(error, file=sys.stderr)

    def answer(self, job: Job, answer: Answer, batch_size: int, repeated_rows: int) -> None:
        """A row's answer to its client (or its cancellation, if the client has gone)."""
        answer.metrics.update(batch_size=batch_size, repeated_rows=repeated_rows)
        if job.cancellation.cancelled:
            self.cancelled += 1
            job.events.put(("cancelled", None))
        else:
            self.served += 1
            job.events.put(("done", answer))

    def health(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "loads": self.loads,
            "requests_served": self.served,
            "requests_cancelled": self.cancelled,
            "requests_failed": self.failed,
            "waiting": self.waiting,
            "busy": self.busy or bool(self.deferred),  # generating, or rows wait to speak
            "batches": self.batches,  # generations run, each for one or more requests
            "largest_batch": self.largest_batch,
        }


def follow(model, processor, lockstep: Lockstep) -> None:
    """Every rank but 0: run the generations rank 0 sends, until it says stop; the speech rank 0 defers waits here
    too (`held`, by generation and row) until rank 0 says which rows speak together."""
    held: dict[tuple[int, int], Answer] = {}
    while True:
        job = lockstep.receive()
        if job["kind"] == STOP["kind"]:
            return
        if job["kind"] == IDLE["kind"]:
            continue
        for key in job.get("forget", []):  # rows whose clients went away before they spoke
            held.pop(tuple(key), None)
        if job["kind"] == "speak" and not job["rows"]:
            continue
        settings = GenerationSettings(**job["settings"])
        on_audio = (lambda row, samples: None) if job["stream_audio"] else None  # code2wav in step with rank 0
        try:  # a cancellation of its own, never set: rank 0's travels in the loop's all-reduce
            if job["kind"] == "speak":
                keys = [tuple(key) for key in job["rows"]]
                answers = [held[key] for key in keys]
                for key in keys:
                    held.pop(key, None)
                speak_held(model, processor, answers, settings, on_audio=on_audio, cancellation=Cancellation())
                continue
            answers = generate_from_inputs(
                model,
                processor,
                job["inputs"],
                settings,
                on_audio=on_audio,
                cancellation=Cancellation(),
                speaking_rows=job["speaking_rows"],
                hold_speech=job["hold_speech"],
            )
        except Cancelled:
            continue
        for row in job["speaking_rows"] if job["hold_speech"] else []:
            held[(job["generation"], row)] = answers[row]
