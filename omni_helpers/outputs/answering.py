"""From answers to what the user sees: rank 0 prints each answer (streamed with --stream)
and files it; every rank logs what it generated, so ranks can be compared.

- `answer_one`: one request; OUTPUT_DIR/result.json and output.wav.
- `answer_in_batches`: many requests, `batch_size` at a time; OUTPUT_DIR/results.jsonl,
  a line per request in input order, written as each batch finishes. With `resume`,
  requests whose ids are already there are skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from omni_helpers.generation.core import Answer, generate_answers
from omni_helpers.measuring.metrics import startup_metrics, summary_line
from omni_helpers.outputs.files import ResultsFile, save_result, speech_digest, write_wav
from omni_helpers.request.errors import RequestError
from omni_helpers.request.request_files import Request
from omni_helpers.request.settings import GenerationSettings
from omni_helpers.request.validation import visual_kinds
from omni_helpers.runtime import Runtime, log


@dataclass
class Output:
    """Where and how rank 0 shows and files the answers."""

    runtime: Runtime
    output_dir: str
    stream: bool = False
    labelled: bool = False  # "<id>: <answer>" lines, for runs with several requests
    run_metrics: Optional[Callable[[], dict[str, Any]]] = None  # load time, memory, parallel mode
    started: Optional[tuple[float, float]] = None  # when the heavy imports and the load were done (time.time())
    first_token_at: Optional[float] = None  # of the run's first answer
    pieces_printed: bool = False  # of the answer being streamed

    def printer(self, request: Request):
        """The on_text callback that streams `request`'s answer to stdout (rank 0, --stream), or None."""
        if not (self.stream and self.runtime.is_main_process):
            return None
        self.pieces_printed = False

        def print_piece(row: int, piece: str) -> None:
            if not self.pieces_printed and self.labelled:
                sys.stdout.write(f"{request.id}: ")
            self.pieces_printed = True
            sys.stdout.write(piece)
            sys.stdout.flush()

        return print_piece

    def show(self, request: Request, answer: Answer) -> None:
        """Log on every rank; print on rank 0 (only the end of the line if it was streamed)."""
        log(
            self.runtime,
            f"text: {(request.id + ' ') if self.labelled else ''}{answer.text!r}; "
            f"speech: {speech_digest(answer.waveform)}",
        )
        if not self.runtime.is_main_process:
            return
        if self.stream and self.pieces_printed:
            print(flush=True)
        else:
            print(f"{request.id}: {answer.text}" if self.labelled else answer.text, flush=True)

    def metrics(self, answer: Answer) -> dict[str, Any]:
        figures = {**answer.metrics, **(self.run_metrics() if self.run_metrics else {})}
        if self.started:
            self.first_token_at = self.first_token_at or answer.first_token_at
            figures.update(startup_metrics(*self.started, self.first_token_at))
        return figures


def answer_one(
    model,
    processor,
    request: Request,
    settings: GenerationSettings,
    output: Output,
    inputs_for_result: dict[str, Any],
    model_name: str,
) -> dict[str, Any]:
    """One request: print it, and (rank 0) write result.json and output.wav. Returns the result."""
    answer = generate_answers(model, processor, [request.conversation], settings, on_text=output.printer(request))[0]
    output.show(request, answer)
    result = {"model": model_name, "inputs": inputs_for_result, "text": answer.text, "metrics": output.metrics(answer)}
    if not output.runtime.is_main_process:
        return dict(result, audio=None)
    log(output.runtime, summary_line(result["metrics"]))
    return save_result(output.output_dir, result, answer.waveform)


def answer_in_batches(
    model,
    processor,
    requests: list[Request],
    settings: GenerationSettings,
    output: Output,
    batch_size: int,
    resume: bool,
) -> list[dict[str, Any]]:
    """Many requests, `batch_size` at a time, filed in OUTPUT_DIR/results.jsonl as each batch
    finishes (rank 0). Returns every request's line, in input order, the skipped ones included."""
    results = ResultsFile(output.output_dir, resume)  # every rank reads it: all must skip the same requests
    positions = {request.id: position for position, request in enumerate(requests, start=1)}
    todo = [r for r in requests if r.id not in results.finished]
    for batch in batches(todo, batch_size):
        lines = [
            line_for(request, answer, output, results, positions[request.id])
            for request, answer in answer_batch(model, processor, batch, settings, output)
        ]
        if output.runtime.is_main_process:
            results.append(lines)
        results.finished.update((line["id"], line) for line in lines)
    return [results.finished[r.id] for r in requests]


def batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """Consecutive requests, `batch_size` at a time, in input order; a batch never mixes requests
    with images and requests with videos (one forward cannot take both; see validation)."""
    grouped: list[list[Request]] = []
    for request in requests:
        if grouped and len(grouped[-1]) < batch_size and len(visual_kinds_of([*grouped[-1], request])) < 2:
            grouped[-1].append(request)
        else:
            grouped.append([request])
    return grouped


def visual_kinds_of(requests: list[Request]) -> set[str]:
    return set().union(*(visual_kinds(request.conversation) for request in requests))


def answer_batch(model, processor, batch: list[Request], settings: GenerationSettings, output: Output):
    """(request, answer or RequestError) for each request of a batch. A request whose media
    fail to decode is answered with its error; the rest of its batch is retried one by one."""
    try:
        on_text = output.printer(batch[0]) if len(batch) == 1 else None
        answers = generate_answers(model, processor, [r.conversation for r in batch], settings, on_text=on_text)
        return list(zip(batch, answers))
    except RequestError as error:
        if len(batch) == 1:
            return [(batch[0], error)]
        return [pair for request in batch for pair in answer_batch(model, processor, [request], settings, output)]


def line_for(request: Request, answer, output: Output, results: ResultsFile, position: int) -> dict[str, Any]:
    """The results.jsonl line of one request (its speech written first, rank 0)."""
    if isinstance(answer, RequestError):
        log(output.runtime, f"error: {request.id}: {answer}")
        if output.runtime.is_main_process:
            print(f"{request.id}: error: {answer}", file=sys.stderr, flush=True)
        return {"id": request.id, "text": None, "audio": None, "error": str(answer), "metrics": None}
    output.show(request, answer)
    audio = None
    if answer.waveform is not None:
        audio = str(results.speech_path(position))
        if output.runtime.is_main_process:
            write_wav(results.speech_path(position), answer.waveform)
    return {"id": request.id, "text": answer.text, "audio": audio, "metrics": output.metrics(answer)}
