"""Measure a running server the way its users meet it: many clients at once, each streamed.

    python web_demo.py --device_target CPU --model_name tiny_ckpt --port 7860 &
    python scripts/bench_serve.py --url http://127.0.0.1:7860 --media_dir sample_media \
        --concurrency 1 2 4 8 --json bench_serve.json

A fixed mixed workload (text questions; image + audio questions; speech asked for on every
other request) is sent at each concurrency: that many clients, each sending its next request
as soon as its last one ended, until the workload has been sent. Every request is streamed
(OpenAI Chat Completions, server-sent events), so that the first token and the first audio
are timed as a client sees them. Before each concurrency's measured pass the workload is sent
once unmeasured (--no-warmup to leave it out), so that the server has compiled the shapes of
the batches that concurrency makes, as one that has served a while has. For each concurrency: requests/s, output tokens/s, time to
first token p50 and p90, time per output token (p50, after the first), time to first audio
p50, and the real-time factor of speech (p50 of a request's time from its first byte sent to
its last received, over the seconds of speech it got). A table is printed; the figures and
every request's own are written to --json.

`--reference_model CKPT` also serves the transformers (PyTorch) reference the way Qwen's own
web demo serves it, one request at a time (`generate`, then the answer), in this process, and
sends it the same workload at the same concurrencies, for a side-by-side in one run. It is loaded
once the server's passes are done, so that its libraries' threads do not share the cores with them.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Describe the sound of rain in one sentence.",
    "Count to five.",
    "What is a short sentence?",
    "Name three colours.",
]
MEDIA_QUESTION = "What can you see and hear? Answer in one short sentence."


@dataclass
class Sent:
    """One request as the client saw it (seconds since it was sent)."""

    kind: str  # "text" or "image_audio"
    speech: bool
    status: int = 0
    first_token: Optional[float] = None
    first_audio: Optional[float] = None
    total: float = 0.0
    output_tokens: int = 0
    audio_seconds: float = 0.0
    error: Optional[str] = None
    texts: list = field(default_factory=list)


# ----------------------------------------------------------------------------- the workload


def data_url(path: Path, mime: str) -> str:
    """A file as a data: URL, as an OpenAI client sends media inline."""
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def workload(media_dir: Path, count: int, max_tokens: int, talker_frames: int) -> list[tuple[str, bool, dict]]:
    """`count` requests: text and image + audio in turn, speech on every other pair; (kind, speech, body)."""
    image = data_url(media_dir / "image.png", "image/png")  # read once: every image + audio request sends the same
    audio = base64.b64encode((media_dir / "audio.wav").read_bytes()).decode()
    requests = []
    for i in range(count):
        kind, speech = ("text", "image_audio")[i % 2], (i // 2) % 2 == 1
        if kind == "text":
            content = QUESTIONS[(i // 2) % len(QUESTIONS)]
        else:
            content = [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                {"type": "text", "text": MEDIA_QUESTION},
            ]
        body = {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        body["stream"] = True
        if speech:
            body.update(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"})
            body["talker_max_new_tokens"] = talker_frames
        requests.append((kind, speech, body))
    return requests


# ----------------------------------------------------------------------------- one client


def send(url: str, kind: str, speech: bool, body: dict) -> Sent:
    """One streamed request, timed from its first byte sent."""
    sent = Sent(kind, speech)
    address = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    started = time.perf_counter()
    try:
        connection.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        sent.status = response.status
        if response.status != 200:
            sent.error = response.read().decode(errors="replace")[:300]
            return sent
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                sent.error = event["error"].get("message")
                break
            choice = event["choices"][0]
            delta, now = choice.get("delta", {}), time.perf_counter() - started
            if delta.get("content"):
                sent.first_token = sent.first_token or now
                sent.texts.append(delta["content"])
            if delta.get("audio") and sent.first_audio is None:
                sent.first_audio = now
            if choice.get("finish_reason"):
                sent.output_tokens = event["usage"]["completion_tokens"]
                sent.audio_seconds = (event.get("metrics") or {}).get("audio_seconds") or 0.0
    except (OSError, http.client.HTTPException) as error:  # the server went away: counted as failed
        sent.error = f"{type(error).__name__}: {error}"
    finally:
        sent.total = time.perf_counter() - started
        connection.close()
    return sent


def at_concurrency(url: str, requests: list, concurrency: int) -> tuple[list[Sent], float]:
    """`concurrency` clients share the requests, each sending its next as soon as its last ended; (what each
    request saw, in the workload's order; the seconds from the first sent to the last ended)."""
    results: list[Optional[Sent]] = [None] * len(requests)
    next_index, lock = [0], threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= len(requests):
                return
            results[index] = send(url, *requests[index])

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


# ----------------------------------------------------------------------------- figures


def percentile(values: list[float], share: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(share * (len(values) - 1))))], 4)


def figures(results: list[Sent], seconds: float) -> dict:
    done = [r for r in results if r.error is None and r.status == 200]
    tokens = sum(r.output_tokens for r in done)
    per_token = [
        (r.total - r.first_token) / (r.output_tokens - 1) for r in done if r.first_token and r.output_tokens > 1
    ]
    speech = [r for r in done if r.speech and r.audio_seconds]
    return {
        "requests": len(results),
        "failed": len(results) - len(done),
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(done) / seconds, 3),
        "output_tokens_per_second": round(tokens / seconds, 2),
        "time_to_first_token_p50": percentile([r.first_token for r in done if r.first_token], 0.5),
        "time_to_first_token_p90": percentile([r.first_token for r in done if r.first_token], 0.9),
        "time_per_output_token_p50": percentile(per_token, 0.5),
        "time_to_first_audio_p50": percentile([r.first_audio for r in speech if r.first_audio], 0.5),
        "real_time_factor_p50": percentile([r.total / r.audio_seconds for r in speech], 0.5),
    }


COLUMNS = [
    ("requests_per_second", "req/s"),
    ("output_tokens_per_second", "tok/s"),
    ("time_to_first_token_p50", "TTFT p50"),
    ("time_to_first_token_p90", "TTFT p90"),
    ("time_per_output_token_p50", "TPOT p50"),
    ("time_to_first_audio_p50", "TTFA p50"),
    ("real_time_factor_p50", "RTF p50"),
]


def table(rows: list[tuple[str, int, dict]]) -> str:
    header = ["server", "concurrency"] + [title for _, title in COLUMNS]
    lines = [header] + [
        [server, str(concurrency)] + ["" if row[key] is None else str(row[key]) for key, _ in COLUMNS]
        for server, concurrency, row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the running server (web_demo.py), e.g. http://127.0.0.1:7860")
    parser.add_argument("--media_dir", default=None, help="sample media (built in a temporary folder if not given)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests sent at each concurrency")
    parser.add_argument("--max_tokens", type=int, default=16, help="each answer's tokens at most")
    parser.add_argument("--talker_frames", type=int, default=16, help="each spoken answer's codec frames at most")
    parser.add_argument("--reference_model", default=None, help="also serve the transformers reference from this")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the workload once, unmeasured, before each concurrency's measured pass (--no-warmup: cold)",
    )
    parser.add_argument("--json", required=True, help="where to write the figures")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be 1 or more")
    return args


def measure(server: tuple[str, str], requests: list, args: argparse.Namespace, rows: list, report: dict) -> None:
    """One server at each concurrency: a warm-up pass (its batches' shapes compiled first, as a server that has run
    a while has them), then the measured one; its row printed as it comes."""
    name, url = server
    for concurrency in args.concurrency:
        if args.warmup:
            at_concurrency(url, requests, concurrency)
        results, seconds = at_concurrency(url, requests, concurrency)
        row = figures(results, seconds)
        rows.append((name, concurrency, row))
        report["runs"].append(
            {"server": name, "concurrency": concurrency, **row, "requests": [asdict(r) for r in results]}
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    media_dir = Path(args.media_dir) if args.media_dir else built_media()
    requests = workload(media_dir, args.requests, args.max_tokens, args.talker_frames)
    rows, report = [], {"workload": [{"kind": k, "speech": s} for k, s, _ in requests], "warmup": args.warmup}
    report["runs"] = []
    measure(("mindspore", args.url), requests, args, rows, report)
    if args.reference_model:  # loaded only now: its libraries' threads in this process would share the cores
        from scripts.reference_server import start_reference_server

        reference = start_reference_server(args.reference_model)
        try:
            measure(("reference", reference.url), requests, args, rows, report)
        finally:
            reference.stop()
    print(table(rows))
    Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def built_media() -> Path:
    import tempfile

    from scripts.make_sample_media import build_media

    folder = Path(tempfile.mkdtemp(prefix="bench_serve_media_"))
    build_media(folder)
    return folder


if __name__ == "__main__":
    main()
