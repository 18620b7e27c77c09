"""web_demo.py: a resident Qwen3-Omni behind the OpenAI client, one process and msrun with 2 workers.

Every answer is compared with the transformers reference (greedy): the text equals the
reference's, the speech is 24 kHz mono and within the flash-attention tolerance of the
reference's waveform; streamed pieces join to the unstreamed answer and leave while the
model is still decoding (the server reports the decoding step of each first piece).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from omni_helpers.request.errors import RequestError
from tests.script_runs import WAV_TOLERANCE_FLASH, expected_answer
from tests.server_runs import data_url, start_server, wav_samples

QUESTION = "What can you see and hear? Answer in one short sentence."
NEW_TOKENS, TALKER_FRAMES = 8, 6  # what the tests ask for
MOST_TOKENS, MOST_FRAMES = 512, 64  # the servers' limits (--max_new_tokens, --talker_max_new_tokens)
pytestmark = pytest.mark.slow


def server_args(checkpoint, *extra) -> list[str]:
    return [
        "--device_target",
        "CPU",
        "--model_name",
        str(checkpoint),
        "--max_queue",
        "1",
        "--max_new_tokens",
        str(MOST_TOKENS),
        "--talker_max_new_tokens",
        str(MOST_FRAMES),
        *extra,
    ]


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="not needed", max_retries=0, timeout=300)


def image_audio_messages(media) -> list[dict]:
    audio = base64.b64encode(media["audio"].read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, sample_media, reference, runtime_cpu):
    """The reference's greedy text and speech for the image + audio question (the media as files)."""
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(sample_media["image"])},
                {"type": "audio", "audio": str(sample_media["audio"])},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    return expected_answer(reference, tiny_checkpoint, conversation, NEW_TOKENS, TALKER_FRAMES)


def ask(server, media, stream: bool, speech: bool = True, messages=None, max_tokens: int = NEW_TOKENS, whole=True):
    """One image + audio + text request (or `messages`) through the openai client: (text, samples, metrics);
    streamed, (text pieces, speech chunks, metrics). `whole`: the answer runs to `max_tokens` (the random
    weights never end the parity requests' answers early), which its usage must say."""
    options = (
        {
            "modalities": ["text", "audio"],
            "audio": {"voice": "Ethan", "format": "wav"},
            "extra_body": {"talker_max_new_tokens": TALKER_FRAMES},
        }
        if speech
        else {}
    )
    messages = messages or image_audio_messages(media)
    request = dict(model="any", messages=messages, max_tokens=max_tokens, **options)
    if not stream:
        response = client(server).chat.completions.create(**request)
        audio = response.choices[0].message.audio
        samples = None
        if speech:
            samples, rate, channels = wav_samples(base64.b64decode(audio.data))
            assert (rate, channels) == (24000, 1)
        if whole:
            assert response.usage.completion_tokens == max_tokens
        return response.choices[0].message.content, samples, response.model_extra["metrics"]
    pieces, audio_chunks, metrics = [], [], None
    for chunk in client(server).chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        if delta.audio:
            data = delta.audio["data"] if isinstance(delta.audio, dict) else delta.audio.data
            audio_chunks.append(np.frombuffer(base64.b64decode(data), "<i2").astype(np.float32) / 32767)
        if chunk.choices[0].finish_reason:
            metrics = chunk.model_extra["metrics"]
    return pieces, audio_chunks, metrics


def check_answers(server, media, expected) -> None:
    """Text and speech as the reference's, whole and streamed; the streamed pieces join to the whole and leave early."""
    expected_text, expected_wav = expected
    text, samples, _ = ask(server, media, stream=False)
    assert text == expected_text
    assert samples.shape == expected_wav.shape and np.abs(samples - expected_wav).max() <= WAV_TOLERANCE_FLASH

    pieces, chunks, metrics = ask(server, media, stream=True)
    assert "".join(pieces) == text and len(pieces) > 1
    joined = np.concatenate(chunks)
    assert joined.shape == samples.shape and np.abs(joined - samples).max() <= 1e-3 and len(chunks) > 1
    # Order of events: the first text left while the thinker was still decoding, the first speech while the talker was.
    assert metrics["first_text_step"] < metrics["thinker_steps"]
    assert metrics["first_audio_step"] < metrics["talker_steps"]
    assert metrics["time_to_first_token_seconds"] > 0 and metrics["time_to_first_audio_seconds"] > 0


# ----------------------------------------------------------------------------- one process


# Limits the sample media can cross (its audio is 2.5 s long, its video 2 s), above every other test's request.
LIMITS = ("--max_audio_seconds", "4", "--max_video_seconds", "1.5", "--max_media_items", "4", "--max_turns", "8")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, sample_media, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "image.png").write_bytes(sample_media["image"].read_bytes())
    scratch = folder / "tmp"  # the server's temporary folder: its requests' media, uploads, spoken answers
    scratch.mkdir()
    args = server_args(tiny_checkpoint, "--allowed_local_media_path", str(allowed), *LIMITS)
    running = start_server(args, folder, TMPDIR=str(scratch))
    yield running
    assert running.stop() == 0  # SIGTERM to an idle server: every rank stops, exit 0
    assert not list(scratch.iterdir())  # what users sent, and were answered with, does not outlive the server


def test_health_and_models(server, tiny_checkpoint):
    health = server.get("/health")
    assert (health["status"], health["model"], health["parallel"], health["world_size"]) == (
        "ready",
        str(tiny_checkpoint),
        "none",
        1,
    )
    assert health["loads"] == 1 and health["speakers"] == ["aiden", "chelsie", "ethan"]
    assert [m.id for m in client(server).models.list().data] == [str(tiny_checkpoint)]


def test_answers_match_the_reference_whole_and_streamed_without_a_reload(server, sample_media, expected):
    served = server.get("/health")["requests_served"]
    check_answers(server, sample_media, expected)
    health = server.get("/health")
    assert health["loads"] == 1 and health["requests_served"] == served + 2


def test_a_conversation_with_history_and_a_local_file_in_the_allowed_folder(
    server, tiny_checkpoint, reference, runtime_cpu
):
    allowed = server.get("/health")  # the server is up; the image was copied into its allowed folder
    image = server.log.parent / "allowed" / "image.png"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": str(image)}}, {"type": "text", "text": "hi"}],
        },
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    response = client(server).chat.completions.create(model="any", messages=messages, max_tokens=NEW_TOKENS)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
    ]
    assert allowed["status"] == "ready"
    assert (
        response.choices[0].message.content == expected_answer(reference, tiny_checkpoint, conversation, NEW_TOKENS)[0]
    )


def body(**fields) -> bytes:
    return json.dumps(
        {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    ).encode()


BAD_REQUESTS = [
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON", None),
    ("no messages", json.dumps({"model": "any"}).encode(), 400, "messages must be", "messages"),
    ("unknown role", body(messages=[{"role": "robot", "content": "hi"}]), 400, "needs a role", "messages[0].role"),
    (
        "unknown voice",
        body(modalities=["text", "audio"], audio={"voice": "Bob"}),
        400,
        "audio.voice Bob",
        "audio.voice",
    ),
    (
        "speech in mp3",
        body(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "mp3"}),
        400,
        "speaks wav",
        "audio.format",
    ),
    ("audio alone", body(modalities=["audio"]), 400, "modalities", "modalities"),
    ("zero max_tokens", body(max_tokens=0), 400, "max_tokens 0", "max_tokens"),
    (
        "unsupported part",
        body(messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}]),
        400,
        "'file' is not supported",
        "messages[0].content[0].type",
    ),
    (
        "corrupt audio",
        body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_audio",
                            "input_audio": {
                                "data": base64.b64encode(b"RIFF0000WAVEfmt nonsense").decode(),
                                "format": "wav",
                            },
                        }
                    ],
                }
            ]
        ),
        400,
        "no decodable audio",
        None,
    ),
    (
        "audio not base64",
        body(
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}
            ]
        ),
        400,
        "not valid base64",
        "messages[0].content[0].data",
    ),
    ("local file, none allowed here", None, 400, "outside the folder", "messages[0].content[0]"),
    (
        "unreachable URL",
        body(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}
            ]
        ),
        400,
        "cannot be fetched",
        None,
    ),
    ("temperature a string", body(temperature="hot"), 400, "temperature must be", "temperature"),
    ("images and videos together", None, 400, "images and videos in one request", "messages"),
]


@pytest.mark.parametrize("name,payload,status,words,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_error_and_the_next_is_answered(
    name, payload, status, words, param, server, sample_media, expected
):
    if name == "local file, none allowed here":
        payload = body(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(sample_media["image"])}}]}
            ]
        )
    if name == "images and videos together":
        payload = body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(sample_media["image"], "image/png")}},
                        {"type": "video_url", "video_url": {"url": data_url(sample_media["video"], "video/mp4")}},
                    ],
                }
            ]
        )
    code, answer = server.post("/v1/chat/completions", payload)
    assert code == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"] and answer["error"]["param"] == param
    assert "Traceback" not in answer["error"]["message"]
    text, _, _ = ask(server, sample_media, stream=False, speech=False)
    assert text == expected[0]


def test_past_max_queue_a_request_gets_429(server, sample_media):
    """--max_queue 1: while a generation runs (the engine takes no request meanwhile), one request waits and the
    next is refused with 429; the waiting one is answered once the generation ends, and so is a later one. (Sent
    all at once, the requests would join one batch instead: queueing is for requests that come during a generation.)"""
    occupier = start_stream(server, MOST_TOKENS)
    codes = []
    waiting = threading.Thread(target=lambda: codes.append(server.post("/v1/chat/completions", body())[0]))
    waiting.start()
    waiting_within(server, 1)
    code, answer = server.post("/v1/chat/completions", body())
    assert code == 429 and "--max_queue 1" in answer["error"]["message"]
    hang_up(occupier)  # its generation is cancelled: the waiting request runs
    waiting.join(timeout=120)
    assert codes == [200]
    code, answer = server.post("/v1/chat/completions", body())
    assert code == 200 and answer["choices"][0]["message"]["content"]


# ----------------------------------------------------------------------------- admission, limits, errors


def server_process(server) -> psutil.Process:
    return psutil.Process(server.process.pid)


@pytest.mark.parametrize(
    "fields,param,words",
    [
        (
            {"max_tokens": 100_000_000},
            "max_tokens",
            f"max_tokens 100000000: above this server's limit of {MOST_TOKENS} (its --max_new_tokens)",
        ),
        ({"max_completion_tokens": MOST_TOKENS + 1}, "max_tokens", f"above this server's limit of {MOST_TOKENS}"),
        (
            {"modalities": ["text", "audio"], "talker_max_new_tokens": 100_000},
            "talker_max_new_tokens",
            f"talker_max_new_tokens 100000: above this server's limit of {MOST_FRAMES} (its --talker_max_new_tokens)",
        ),
        (
            {"messages": [{"role": "user", "content": " a" * 32_700}], "max_tokens": 100},
            "max_tokens",
            "the thinker's context holds 32768 positions (max_position_embeddings) and this prompt takes",
        ),
    ],
)
def test_a_request_beyond_the_limits_gets_400_before_anything_is_allocated(
    fields, param, words, server, sample_media, expected
):
    resident = server_process(server).memory_info().rss
    code, answer = server.post("/v1/chat/completions", body(**fields))
    assert code == 400 and answer["error"]["param"] == param and words in answer["error"]["message"]
    assert server_process(server).memory_info().rss - resident < 64 * 2**20  # nothing sized by the request
    assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]  # and the server goes on


def user_turn(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def over_the_limits(media: dict) -> list[tuple[list[dict], str]]:
    """(messages, the words of the error): each past one of the server's LIMITS."""
    audio_data = data_url(media["audio"], "audio/wav").split(",")[1]
    audio = {"type": "input_audio", "input_audio": {"data": audio_data, "format": "wav"}}
    image = {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}}
    video = {"type": "video_url", "video_url": {"url": data_url(media["video"], "video/mp4")}}
    return [
        (
            [user_turn(audio, audio)],
            "5.0 s of audio in this request: above this server's limit of 4 (its --max_audio_seconds)",
        ),
        (
            [user_turn(video)],
            "2.0 s of video in this request: above this server's limit of 1.5 (its --max_video_seconds)",
        ),
        (
            [user_turn(image, image, image, image, image)],
            "5 images, audio and video items in this request: above this server's limit of 4 (its --max_media_items)",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 4
            + [{"role": "user", "content": "and?"}],
            "9 messages in this request: above this server's limit of 8 (its --max_turns)",
        ),
    ]


def test_a_request_past_the_media_or_turn_limits_gets_400_naming_the_flag(server, sample_media, expected):
    for messages, words in over_the_limits(sample_media):
        code, answer = server.post("/v1/chat/completions", body(messages=messages))
        message = answer["error"]["message"]
        assert code == 400 and message.startswith(words) and answer["error"]["param"] == "messages", answer
    assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]  # and the server goes on


def test_a_requests_speech_limit_caps_its_speech(server):
    answer = client(server).chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        extra_body={"talker_max_new_tokens": 5},
    )
    samples, rate, _ = wav_samples(base64.b64decode(answer.choices[0].message.audio.data))
    frames = answer.model_extra["metrics"]["talker_codec_frames"]
    assert 0 < frames <= 5 and len(samples) <= 5 * rate / 12.5  # 12.5 codec frames per second of speech


@pytest.mark.parametrize(
    "method,path,status,allow,words",
    [
        ("GET", "/v1/chat/completions", 405, "POST", "GET /v1/chat/completions: use POST"),
        ("PUT", "/v1/chat/completions", 405, "POST", "PUT /v1/chat/completions: use POST"),
        ("POST", "/health", 405, "GET", "POST /health: use GET"),
        ("GET", "/v1/completions", 404, None, "GET /v1/completions: no such route"),
        ("POST", "/chat/completions", 404, None, "POST /chat/completions: no such route"),
    ],
)
def test_a_wrong_method_gets_405_and_an_unknown_route_404_in_the_apis_shape(method, path, status, allow, words, server):
    import urllib.request

    request = urllib.request.Request(server.url + path, data=b"{}" if method != "GET" else None, method=method)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    answer = json.loads(refused.value.read())
    assert refused.value.code == status and set(answer) == {"error"} and words in answer["error"]["message"]
    assert refused.value.headers.get("allow") == allow


def send_stream(server, max_tokens: int):
    """A streamed request sent on a raw connection, its response not read yet."""
    return post_in_part(server, body(max_tokens=max_tokens, stream=True))


def post_in_part(server, whole: bytes, half: bool = False):
    """A POST to /v1/chat/completions on a raw connection, the whole body sent or its first half; the response not
    read yet."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=120)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(whole)))
    connection.endheaders(whole[: len(whole) // 2] if half else whole)
    return connection


def read_pieces(response, count: int) -> None:
    """Reads a streamed response up to its `count`-th piece of text."""
    pieces = 0
    while pieces < count:
        line = response.fp.readline()
        assert line, "the stream ended early"
        pieces += b'"content": "' in line and b'"content": ""' not in line


def start_stream(server, max_tokens: int):
    """A streamed request read up to its third piece of text; returns the open connection."""
    connection = send_stream(server, max_tokens)
    read_pieces(connection.getresponse(), 3)
    return connection


def hang_up(connection) -> None:
    """Close a streamed request's connection mid-answer, as a client that goes away does."""
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def idle_within(server, seconds: float) -> dict:
    deadline = time.time() + seconds
    while (health := server.get("/health"))["busy"] or health["waiting"]:
        assert time.time() < deadline, health
        time.sleep(0.05)
    return health


def server_log(server) -> str:
    """Rank 0's log: the server's own in one process, worker 0's under msrun."""
    return server.log.read_text(errors="replace") if server.log_dir is None else server.worker_log(0)


def cancelled_steps(server) -> list[int]:
    """The decoding steps each cancelled request took, from the server's log."""
    text = server_log(server)
    return [
        int(line.split("cancelled after ")[1].split()[0]) for line in text.splitlines() if "cancelled after" in line
    ]


def test_a_stream_closed_mid_answer_stops_its_generation_and_the_next_request_starts_at_once(
    server, sample_media, expected
):
    before = server.get("/health")["requests_cancelled"]
    connection = start_stream(server, MOST_TOKENS)
    hang_up(connection)
    assert idle_within(server, 10)["requests_cancelled"] == before + 1
    assert cancelled_steps(server)[-1] < MOST_TOKENS // 4  # stopped within steps of the disconnect, not at its end
    started = time.time()
    assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]
    assert time.time() - started < 60


def test_a_client_that_hangs_up_on_a_whole_answer_cancels_it(server):
    before = server.get("/health")["requests_cancelled"]
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as raw:
        request = body(max_tokens=MOST_TOKENS)
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        deadline = time.time() + 60
        while not server.get("/health")["busy"]:
            assert time.time() < deadline
            time.sleep(0.05)
    assert idle_within(server, 10)["requests_cancelled"] == before + 1


def test_an_allocation_failure_gets_500_and_the_server_goes_on(server, sample_media, expected):
    """The process may grow by 256 MiB more (RLIMIT_AS): the request's prompt of 12,000 tokens needs attention
    scores of 2.3 GB and fails, while the server's own small allocations (a thread's stack) still fit."""
    import resource

    process = server_process(server)
    process.rlimit(psutil.RLIMIT_AS, (process.memory_info().vms + 256 * 2**20, resource.RLIM_INFINITY))
    try:
        code, answer = server.post(
            "/v1/chat/completions", body(messages=[{"role": "user", "content": "rain " * 3000}], max_tokens=32)
        )
    finally:
        process.rlimit(psutil.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert code == 500 and answer["error"]["type"] == "server_error"
    assert answer["error"]["message"].startswith("the device ran out of memory during this request")
    assert server.get("/health")["requests_failed"] >= 1
    assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]


def test_speech_from_a_checkpoint_without_a_talker_is_refused(tiny_thinking, tmp_path):
    """Also: the server answers from the start, "ready": false and 503 while the model loads."""
    seen = {}

    def while_loading(server, health):
        seen["health"], seen["answer"] = health, server.post("/v1/chat/completions", body())

    thinking = start_server(server_args(tiny_thinking), tmp_path, while_loading=while_loading)
    try:
        assert (seen["health"]["status"], seen["health"]["ready"]) == ("loading", False)
        code, answer = seen["answer"]
        assert code == 503 and "the model is still loading" in answer["error"]["message"]
        assert thinking.get("/health")["speech"] is False
        code, answer = thinking.post(
            "/v1/chat/completions", body(modalities=["text", "audio"], audio={"voice": "Ethan"})
        )
        assert code == 400 and "has no talker" in answer["error"]["message"]
        code, answer = thinking.post("/v1/chat/completions", body())
        assert code == 200 and answer["choices"][0]["message"]["content"]
    finally:
        assert thinking.stop() == 0


def test_sigterm_mid_answer_exits_at_once_with_143_and_leaves_no_files(tiny_checkpoint, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = start_server(server_args(tiny_checkpoint), tmp_path, TMPDIR=str(scratch))
    try:
        connection = start_stream(server, MOST_TOKENS)  # seconds of answer still to come
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 128 + signal.SIGTERM
        connection.close()
    finally:
        server.stop()
    assert not list(scratch.iterdir())


# ----------------------------------------------------------------------------- a real browser


def browser():
    """Debian's headless Chromium, driven by its own chromedriver (never a downloaded one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(check, seconds: float = 180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError("the page never showed it")


class Page:
    """The UI in a headless browser, as a user drives it."""

    def __init__(self, server):
        from selenium.webdriver.common.by import By

        self.by, self.driver = By, browser()
        self.driver.get(server.url)
        wait_for(lambda: self.find("#question textarea"), 60)

    def find(self, selector: str):
        return self.driver.find_elements(self.by.CSS_SELECTOR, selector)

    def bot_texts(self) -> list[str]:
        return [
            e.text
            for e in self.find("#chat [data-testid=bot]")
            if "component of type audio" not in (e.get_attribute("aria-label") or "")
        ]

    def set_number(self, elem_id: str, value) -> None:
        """A slider's number box, typed into as a user does."""
        from selenium.webdriver.common.keys import Keys

        number = self.find(f"#{elem_id} input[type=number]")[0]
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys(str(value), Keys.TAB)

    def ask(self, question: str, files=()) -> None:
        from selenium.webdriver.common.keys import Keys

        if files:
            self.find("#question input[type=file]")[0].send_keys("\n".join(map(str, files)))
            wait_for(lambda: len(self.find("#question .thumbnail-item, #question img")) >= 1, 60)
        box = self.find("#question textarea")[0]
        box.send_keys(question)
        box.send_keys(Keys.ENTER)

    def question_box(self) -> str:
        return self.find("#question textarea")[0].get_attribute("value")

    def shows(self, words: str) -> bool:
        return words in self.driver.find_element(self.by.TAG_NAME, "body").text


def test_a_browser_asks_with_an_image_and_audio_then_follows_up(
    server, sample_media, expected, tiny_checkpoint, reference, runtime_cpu, tmp_path
):
    page = Page(server)
    try:
        page.set_number("max_tokens", NEW_TOKENS)
        page.find("#speak input")[0].click()
        page.set_number("speech_seconds", 1)
        page.ask(QUESTION, [sample_media["image"], sample_media["audio"]])
        wait_for(lambda: page.find("#chat [data-testid=bot] [data-testid=waveform-Audio]"))
        assert page.bot_texts() == [expected[0]]  # the reference's answer, with an audio player after it

        page.find("#speak input")[0].click()  # text only for the follow-up
        page.ask("And now?")
        wait_for(lambda: len(page.bot_texts()) == 2 and page.bot_texts()[1])
        history = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(sample_media["image"])},
                    {"type": "audio", "audio": str(sample_media["audio"])},
                    {"type": "text", "text": QUESTION},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": expected[0]}]},
            {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
        ]
        follow_up = expected_answer(reference, tiny_checkpoint, history, NEW_TOKENS)[0]
        wait_for(lambda: page.bot_texts()[1] == follow_up, 60)  # answered with the first turn in its history
        screenshot = Path(os.environ.get("WEB_DEMO_SCREENSHOT", tmp_path / "web_demo.png"))
        page.driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        page.driver.quit()


def test_a_browser_keeps_a_question_sent_mid_answer_stops_on_request_and_a_closed_tab_cancels(server):
    from omni_helpers.serving.web_ui import STILL_ANSWERING

    before = server.get("/health")["requests_cancelled"]
    page = Page(server)
    try:
        page.ask("Tell me a long story.")  # the server's limit of tokens: an answer that takes a while
        wait_for(lambda: page.bot_texts() and page.bot_texts()[-1], 60)
        page.ask("And then?")  # sent while the answer still streams
        wait_for(lambda: page.shows(STILL_ANSWERING), 30)
        assert page.question_box() == "And then?"  # kept, not lost
        page.find("#stop")[0].click()
        wait_for(lambda: page.bot_texts()[-1].endswith("⏹ stopped"), 30)
        assert idle_within(server, 10)["requests_cancelled"] == before + 1

        page.set_number("max_tokens", NEW_TOKENS)
        page.ask("")  # Enter on the question kept in the box
        wait_for(lambda: len(page.bot_texts()) == 2 and page.bot_texts()[1], 60)
        assert page.question_box() == ""

        page.set_number("max_tokens", MOST_TOKENS)
        page.ask("Once more, at length.")
        wait_for(lambda: len(page.bot_texts()) == 3 and page.bot_texts()[2], 60)
    finally:
        page.driver.quit()  # the tab closes mid-answer
    assert idle_within(server, 15)["requests_cancelled"] == before + 2


# ----------------------------------------------------------------------------- batches


PROMPTS = ["Hi", "Describe the sound of rain.", "Count to three, slowly please.", "What is a short sentence?"]
BATCH_TOKENS = 64  # long enough that a client hanging up after its first piece does so mid-batch


def ask_text(server, prompt: str, stream: bool) -> tuple[str, dict]:
    """A text question, no speech: (the answer, its metrics), streamed pieces joined."""
    messages = [{"role": "user", "content": prompt}]
    text, _, metrics = ask(server, None, stream, False, messages, max_tokens=BATCH_TOKENS, whole=False)
    return "".join(text), metrics


def waiting_within(server, count: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while server.get("/health")["waiting"] < count:
        assert time.time() < deadline, server.get("/health")
        time.sleep(0.05)


@pytest.mark.parametrize("flag", ["--max_batch_size", "--graphs_kept"])
def test_a_batch_flag_below_one_is_refused_naming_it(flag, tiny_checkpoint):
    import web_demo

    args = web_demo.parse_args(["--device_target", "CPU", "--model_name", str(tiny_checkpoint), flag, "0"])
    with pytest.raises(RequestError, match=f"^{flag} 0: must be 1 or more$"):
        web_demo.check(args)


@pytest.mark.parametrize("flag", ["--batch_window_ms", "--speech_window_ms"])
def test_a_negative_window_is_refused_naming_it(flag, tiny_checkpoint):
    import web_demo

    args = web_demo.parse_args(["--device_target", "CPU", "--model_name", str(tiny_checkpoint), flag, "-5"])
    with pytest.raises(RequestError, match=f"^{flag} -5: must be 0 or more$"):
        web_demo.check(args)


def test_requests_waiting_together_run_as_one_batch_each_answered_as_alone(tiny_checkpoint, sample_media, tmp_path):
    server = start_server(server_args(tiny_checkpoint, *BATCHING), tmp_path)
    try:
        check_batching(server)
        check_speech_batching(server, sample_media)
        check_a_speaker_gone_before_its_speech_is_let_go(server, sample_media)
        check_a_request_still_sending_joins_the_batch(server)
    finally:
        assert server.stop() == 0


BATCHING = ("--max_queue", "8", "--max_batch_size", str(len(PROMPTS) + 1))


def check_batching(server) -> None:
    """Four clients ask while a fifth's answer is being generated: once it ends (its client hangs up), the four
    and a sixth run as the rows of one batch, each streamed or answered its own row, equal to its answer asked
    alone; the sixth hangs up mid-batch, which costs the others nothing."""
    alone = [ask_text(server, prompt, stream=False) for prompt in PROMPTS]
    assert all(metrics["batch_size"] == 1 for _, metrics in alone)
    before = server.get("/health")

    occupier = start_stream(server, MOST_TOKENS)  # the engine is busy with it from here
    answers: dict[int, tuple[str, dict]] = {}
    threads = [
        threading.Thread(target=lambda i=i: answers.__setitem__(i, ask_text(server, PROMPTS[i], stream=i % 2 == 1)))
        for i in range(len(PROMPTS))
    ]
    for thread in threads:
        thread.start()
    waiting_within(server, len(PROMPTS))
    leaver = start_stream_after(server, len(PROMPTS))  # joins the waiting ones, hangs up once its row streams
    hang_up(occupier)
    leaver.read_some_and_hang_up()
    for thread in threads:
        thread.join(timeout=300)

    assert sorted(answers) == list(range(len(PROMPTS)))
    for i, (text, metrics) in sorted(answers.items()):
        assert text == alone[i][0], PROMPTS[i]
        assert metrics["batch_size"] == len(PROMPTS) + 1
    health = idle_within(server, 30)
    assert health["largest_batch"] == len(PROMPTS) + 1 and health["batches"] == before["batches"] + 2
    assert health["requests_cancelled"] == before["requests_cancelled"] + 2  # the occupier and the leaver
    assert health["requests_served"] == before["requests_served"] + len(PROMPTS)


def check_a_request_still_sending_joins_the_batch(server) -> None:
    """Clients asking at once, one of them still sending its body (media inline make bodies large) when the other's
    request is queued: the batch waits for it (up to --batch_window_ms, 200) and answers both as one batch of two."""
    alone = [ask_text(server, prompt, stream=False) for prompt in PROMPTS[:2]]
    bodies = [body(messages=[{"role": "user", "content": prompt}], max_tokens=BATCH_TOKENS) for prompt in PROMPTS[:2]]
    sending = post_in_part(server, bodies[1], half=True)
    time.sleep(0.5)  # its handler is reading the body
    asking = post_in_part(server, bodies[0])
    time.sleep(0.1)  # the first request queued, its batch about to start
    sending.send(bodies[1][len(bodies[1]) // 2 :])
    answers = [json.loads(connection.getresponse().read()) for connection in (asking, sending)]
    for (text, _), answer in zip(alone, answers):
        assert answer["choices"][0]["message"]["content"] == text and answer["metrics"]["batch_size"] == 2


class HangingUp:
    """A streamed request on a raw connection: `read_some_and_hang_up` reads its first piece of text, then closes."""

    def __init__(self, connection):
        self.connection = connection

    def read_some_and_hang_up(self) -> None:
        read_pieces(self.connection.getresponse(), 1)
        hang_up(self.connection)


def start_stream_after(server, waiting: int) -> HangingUp:
    """A streamed request, sent once `waiting` others wait: it waits behind them."""
    connection = send_stream(server, BATCH_TOKENS)
    waiting_within(server, waiting + 1)
    return HangingUp(connection)


def check_speech_batching(server, media) -> None:
    """Three clients asking while another's answer is generated run as one batch, two for streamed speech (a
    greeting; image + audio) and one for text only (image + audio), answered as the thinker ends. That client asks
    again at once, with speech: the first batch's speech waits for it (--speech_window_ms), and the three speak as
    one talker batch. Each is streamed its own row's text and speech, equal to what it is answered alone, and the
    text-only row gets no speech."""
    image_audio = None  # ask's own question
    questions = [[{"role": "user", "content": "Hi"}], image_audio, image_audio, [{"role": "user", "content": "Hello"}]]
    speaks = [True, True, False, True]
    alone = [ask(server, media, False, speaks[i], messages=questions[i]) for i in range(len(questions))]
    occupier = start_stream(server, MOST_TOKENS)
    answers: dict[int, tuple] = {}
    answered_at: dict[int, float] = {}

    def asking(i: int) -> None:
        answers[i] = ask(server, media, True, speaks[i], messages=questions[i])
        answered_at[i] = time.perf_counter()
        if i == 2:  # answered in text: the client asks again
            asking(3)

    threads = [threading.Thread(target=asking, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    waiting_within(server, 3)
    hang_up(occupier)
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(answers) == [0, 1, 2, 3]
    for i, ((text, samples, _), (pieces, chunks, metrics)) in enumerate(zip(alone, [answers[i] for i in range(4)])):
        assert "".join(pieces) == text
        assert (metrics["batch_size"], metrics["repeated_rows"]) == ((3, 1) if i < 3 else (1, 0)), i  # 3 padded to 4
        if not speaks[i]:
            assert samples is None and chunks == [] and metrics["talker_codec_frames"] == 0
            continue
        assert metrics["speech_batch_size"] == 3, i  # the speaking rows of both batches
        joined = np.concatenate(chunks)
        assert len(chunks) > 1 and joined.shape == samples.shape and np.abs(joined - samples).max() <= 1e-3
        assert metrics["first_audio_step"] < metrics["talker_steps"]
    assert idle_within(server, 30)["largest_batch"] >= 3
    assert answered_at[2] < min(answered_at[i] for i in (0, 1))  # the text-only client was answered before speech


def check_a_speaker_gone_before_its_speech_is_let_go(server, media) -> None:
    """A client whose speech waits for the next batch's (its text streamed) hangs up while that batch runs: its
    speech is let go unspoken, and the server, every rank in step, answers the next request as alone."""
    greeting = [{"role": "user", "content": "Hi"}]
    alone = ask(server, media, False, True, messages=greeting)
    before, let_go = server.get("/health"), server_log(server).count("let go unspoken")
    occupier = start_stream(server, MOST_TOKENS)
    spoken = {"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"}}
    speaker = post_in_part(server, body(messages=greeting, max_tokens=BATCH_TOKENS, stream=True, **spoken))
    text_only = send_stream(server, BATCH_TOKENS)
    waiting_within(server, 2)
    hang_up(occupier)
    text_only.getresponse().read()  # answered as the thinker ends; the speaker's speech waits for its next request
    asking_again = send_stream(server, MOST_TOKENS).getresponse()
    read_pieces(asking_again, 3)  # its batch runs
    hang_up(speaker)
    while b"[DONE]" not in asking_again.fp.readline():  # hundreds of steps: the hang-up is seen long before they end
        pass
    health = idle_within(server, 30)
    assert health["requests_cancelled"] == before["requests_cancelled"] + 2  # the occupier and the speaker
    assert health["requests_served"] == before["requests_served"] + 2
    assert server_log(server).count("1 request(s) let go unspoken") == let_go + 1
    text, samples, _ = ask(server, media, False, True, messages=greeting)
    assert text == alone[0] and np.abs(samples - alone[1]).max() <= 1e-3


# ----------------------------------------------------------------------------- msrun


@pytest.mark.parametrize("mode", ["zero3", "expert"])
def test_msrun_two_workers_answer_as_the_reference(mode, tiny_checkpoint, sample_media, expected, tmp_path):
    server = start_server(server_args(tiny_checkpoint, "--parallel", mode, *BATCHING), tmp_path, msrun=True)
    try:
        health = server.get("/health")
        assert (health["parallel"], health["world_size"]) == (mode, 2)
        check_answers(server, sample_media, expected)
        code, answer = server.post("/v1/chat/completions", body(modalities=["text", "audio"], audio={"voice": "Bob"}))
        assert code == 400  # refused on rank 0: the workers never hear of it ...
        assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]  # ... and stay in step
        connection = start_stream(server, MOST_TOKENS)  # a stream closed mid-answer: every rank stops at one step
        hang_up(connection)
        assert idle_within(server, 30)["requests_cancelled"] == 1
        assert cancelled_steps(server)[-1] < MOST_TOKENS // 4
        assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]  # still in step
        check_batching(server)  # every rank runs the batch, in step
        check_speech_batching(server, sample_media)
        check_a_speaker_gone_before_its_speech_is_let_go(server, sample_media)
        assert server.get("/health")["loads"] == 1
    finally:
        returncode = server.stop()
    assert returncode == 0
    for rank in (0, 1):
        assert "Traceback" not in server.worker_log(rank)


def test_a_worker_that_dies_mid_request_ends_the_server(tiny_checkpoint, tmp_path):
    server = start_server(server_args(tiny_checkpoint, "--verbose"), tmp_path, msrun=True, cluster_time_out=30)
    try:
        thread = threading.Thread(
            target=lambda: server.post("/v1/chat/completions", body(max_tokens=400), timeout=120), daemon=True
        )  # its connection is cut when the server ends
        thread.start()
        deadline = time.time() + 60
        while "decode step 3" not in server.worker_log(1):
            assert time.time() < deadline
            time.sleep(0.2)
        server.rank(1).kill()
        killed = time.time()
        returncode = server.process.wait(timeout=120)
        assert returncode != 0 and time.time() - killed < 90
    finally:
        server.stop()


def test_sigterm_to_rank_0_ends_every_rank(tiny_checkpoint, tmp_path):
    server = start_server(server_args(tiny_checkpoint), tmp_path, msrun=True)
    ranks = [server.rank(rank) for rank in (0, 1)]
    assert all(ranks)
    os.kill(ranks[0].pid, signal.SIGTERM)
    stopped = time.time()
    returncode = server.process.wait(timeout=60)
    assert time.time() - stopped < 30 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    assert returncode == 0  # idle: rank 0 told the workers to stop, and all exited cleanly
