"""A resident Qwen3-Omni: the model loaded once, requests answered one at a time, in arrival order.

Rank 0 runs the `Engine`: the HTTP API and the browser UI submit jobs from their own
threads; the engine takes them in order in the main thread (where MindSpore runs),
preprocesses each (template, media, processor), sends it to the other ranks (`lockstep`)
and generates. Every other rank runs `follow`: the same generations, as rank 0 sends them.
What a job produces (text pieces, speech chunks, the answer, or its error) arrives on its
own queue of events.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .checkpoint import Checkpoint
from .conversation import Conversation
from .core import Answer, generate_from_inputs, prepare_inputs
from .errors import RequestError
from .lockstep import IDLE, STOP, Lockstep
from .requests import Request
from .settings import GenerationSettings
from .validation import check_requests, check_settings


HEARTBEAT_SECONDS = 5  # an idle rank 0 tells the others so this often: a rank waiting in a collective
# times out (after 30 s with MindSpore's mccl on CPU; HCCL_EXEC_TIMEOUT, 30 min by default, on Ascend)


class QueueFull(Exception):
    """More requests are waiting than --max_queue allows (HTTP 429)."""


@dataclass
class Job:
    conversation: Conversation
    settings: GenerationSettings
    stream_audio: bool = False  # hand speech out as the talker speaks (else only the whole waveform)
    submitted: float = field(default_factory=time.perf_counter)
    # ("started", None), ("text", str), ("audio", samples), then ("done", Answer) or ("error", exception)
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)


class Engine:
    def __init__(self, model, processor, checkpoint: Checkpoint, lockstep: Lockstep, max_queue: int):
        self.model, self.processor, self.checkpoint = model, processor, checkpoint
        self.lockstep, self.max_queue = lockstep, max_queue
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.lock = threading.Lock()
        self.waiting = 0
        self.busy = False
        self.served = 0
        self.loads = 1  # the model was loaded once, before the engine was made

    def submit(self, conversation: Conversation, settings: GenerationSettings, stream_audio: bool = False) -> Job:
        """Queue a checked request; raises QueueFull past --max_queue waiting requests."""
        with self.lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting already (--max_queue {self.max_queue}); try again shortly")
            self.waiting += 1
        job = Job(conversation, settings, stream_audio)
        self.jobs.put(job)
        return job

    def check_and_submit(self, conversation: Conversation, settings: GenerationSettings, media_folder: Path,
                         names: dict[str, str], stream_audio: bool = False) -> Job:  # fmt: skip
        """Check a request against the checkpoint (`names`: how the caller spells each setting),
        fetch and decode its media into `media_folder`, and queue it. Raises RequestError or QueueFull."""
        check_settings(settings, self.checkpoint, names=names)
        (request,) = check_requests([Request("request", conversation)], self.checkpoint, settings, media_folder)
        return self.submit(request.conversation, settings, stream_audio)

    def stop(self) -> None:
        """Let the engine finish the job it runs, tell the other ranks to stop, and return."""
        self.jobs.put(None)

    def serve_forever(self) -> None:
        """Rank 0's main thread: answer jobs in arrival order until `stop`."""
        while True:
            try:
                job = self.jobs.get(timeout=HEARTBEAT_SECONDS)
            except queue.Empty:
                self.lockstep.send(IDLE)  # the other ranks wait inside a broadcast: keep it short
                continue
            if job is None:
                self.lockstep.send(STOP)
                return
            with self.lock:
                self.waiting -= 1
            self.busy = True
            try:
                self.run(job)
            finally:
                self.busy = False

    def run(self, job: Job) -> None:
        try:
            inputs = prepare_inputs(self.processor, [job.conversation], job.settings)
        except RequestError as error:  # rejected on rank 0: the other ranks never hear of it
            job.events.put(("error", error))
            return
        self.lockstep.send({"kind": "generate", "settings": dataclasses.asdict(job.settings),
                            "stream_audio": job.stream_audio, "inputs": inputs})  # fmt: skip
        job.events.put(("started", None))
        try:
            answer: Answer = generate_from_inputs(
                self.model, self.processor, inputs, job.settings, started=job.submitted,
                on_text=lambda row, piece: job.events.put(("text", piece)),
                on_audio=(lambda samples: job.events.put(("audio", samples))) if job.stream_audio else None,
            )[0]  # fmt: skip
        except Exception as error:  # a fault, not a bad request: the ranks may be out of step, so the server ends
            job.events.put(("error", error))
            raise
        self.served += 1
        job.events.put(("done", answer))

    def health(self) -> dict[str, Any]:
        return {"loads": self.loads, "requests_served": self.served, "waiting": self.waiting, "busy": self.busy}


def follow(model, processor, lockstep: Lockstep) -> None:
    """Every rank but 0: run the generations rank 0 sends, until it says stop."""
    while True:
        job = lockstep.receive()
        if job["kind"] == STOP["kind"]:
            return
        if job["kind"] == IDLE["kind"]:
            continue
        settings = GenerationSettings(**job["settings"])
        on_audio = (lambda samples: None) if job["stream_audio"] else None  # code2wav in step with rank 0
        generate_from_inputs(model, processor, job["inputs"], settings, on_audio=on_audio)
