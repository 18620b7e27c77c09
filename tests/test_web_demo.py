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
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.script_runs import WAV_TOLERANCE_FLASH, expected_answer
from tests.server_runs import data_url, start_server, wav_samples

QUESTION = "What can you see and hear? Answer in one short sentence."
NEW_TOKENS, TALKER_FRAMES = 8, 6
pytestmark = pytest.mark.slow


def server_args(checkpoint, *extra) -> list[str]:
    return ["--device_target", "CPU", "--model_name", str(checkpoint), "--max_queue", "1",
            "--max_new_tokens", str(NEW_TOKENS), "--talker_max_new_tokens", str(TALKER_FRAMES), *extra]  # fmt: skip


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="not needed", max_retries=0, timeout=300)


def image_audio_messages(media) -> list[dict]:
    audio = base64.b64encode(media["audio"].read_bytes()).decode()
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
        {"type": "text", "text": QUESTION},
    ]}]  # fmt: skip


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, sample_media, reference, runtime_cpu):
    """The reference's greedy text and speech for the image + audio question (the media as files)."""
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(sample_media["image"])},
                                                 {"type": "audio", "audio": str(sample_media["audio"])},
                                                 {"type": "text", "text": QUESTION}]}]  # fmt: skip
    return expected_answer(reference, tiny_checkpoint, conversation, NEW_TOKENS, TALKER_FRAMES)


def ask(server, media, stream: bool, speech: bool = True):
    """One image + audio + text request through the openai client: (text, samples, metrics)."""
    options = {"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"}} if speech else {}
    request = dict(model="any", messages=image_audio_messages(media), max_tokens=NEW_TOKENS, **options)
    if not stream:
        response = client(server).chat.completions.create(**request)
        audio = response.choices[0].message.audio
        samples = None
        if speech:
            samples, rate, channels = wav_samples(base64.b64decode(audio.data))
            assert (rate, channels) == (24000, 1)
        assert response.usage.completion_tokens == NEW_TOKENS
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


@pytest.fixture(scope="module")
def server(tiny_checkpoint, sample_media, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "image.png").write_bytes(sample_media["image"].read_bytes())
    running = start_server(server_args(tiny_checkpoint, "--allowed_local_media_path", str(allowed)), folder)
    yield running
    assert running.stop() == 0  # SIGTERM to an idle server: every rank stops, exit 0


def test_health_and_models(server, tiny_checkpoint):
    health = server.get("/health")
    assert (health["status"], health["model"], health["parallel"], health["world_size"]) == ("ready", str(tiny_checkpoint), "none", 1)
    assert health["loads"] == 1 and health["speakers"] == ["aiden", "chelsie", "ethan"]
    assert [m.id for m in client(server).models.list().data] == [str(tiny_checkpoint)]


def test_answers_match_the_reference_whole_and_streamed_without_a_reload(server, sample_media, expected):
    served = server.get("/health")["requests_served"]
    check_answers(server, sample_media, expected)
    health = server.get("/health")
    assert health["loads"] == 1 and health["requests_served"] == served + 2


def test_a_conversation_with_history_and_a_local_file_in_the_allowed_folder(server, tiny_checkpoint, reference, runtime_cpu):
    allowed = server.get("/health")  # the server is up; the image was copied into its allowed folder
    image = server.log.parent / "allowed" / "image.png"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and now?"}]  # fmt: skip
    response = client(server).chat.completions.create(model="any", messages=messages, max_tokens=NEW_TOKENS)
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "hi"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                    {"role": "user", "content": [{"type": "text", "text": "and now?"}]}]  # fmt: skip
    assert allowed["status"] == "ready"
    assert response.choices[0].message.content == expected_answer(reference, tiny_checkpoint, conversation, NEW_TOKENS)[0]


def body(**fields) -> bytes:
    return json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}).encode()


BAD_REQUESTS = [
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON", None),
    ("no messages", json.dumps({"model": "any"}).encode(), 400, "messages must be", "messages"),
    ("unknown role", body(messages=[{"role": "robot", "content": "hi"}]), 400, "needs a role", "messages[0].role"),
    ("unknown voice", body(modalities=["text", "audio"], audio={"voice": "Bob"}), 400, "audio.voice Bob", "audio.voice"),
    ("speech in mp3", body(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "mp3"}), 400, "speaks wav", "audio.format"),
    ("audio alone", body(modalities=["audio"]), 400, "modalities", "modalities"),
    ("zero max_tokens", body(max_tokens=0), 400, "max_tokens 0", "max_tokens"),
    ("unsupported part", body(messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}]), 400,
     "'file' is not supported", "messages[0].content[0].type"),
    ("corrupt audio", body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF0000WAVEfmt nonsense").decode(), "format": "wav"}}]}]), 400, "no decodable audio", None),
    ("audio not base64", body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "@@@", "format": "wav"}}]}]), 400, "not valid base64", "messages[0].content[0].data"),
    ("local file, none allowed here", None, 400, "outside the folder", "messages[0].content[0]"),
    ("unreachable URL", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]),
     400, "cannot be fetched", None),
    ("temperature a string", body(temperature="hot"), 400, "temperature must be", "temperature"),
    ("images and videos together", None, 400, "images and videos in one request", "messages"),
]  # fmt: skip


@pytest.mark.parametrize("name,payload,status,words,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_its_error_and_the_next_is_answered(name, payload, status, words, param, server, sample_media, expected):
    if name == "local file, none allowed here":
        payload = body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(sample_media["image"])}}]}])
    if name == "images and videos together":
        payload = body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(sample_media["image"], "image/png")}},
            {"type": "video_url", "video_url": {"url": data_url(sample_media["video"], "video/mp4")}}]}])  # fmt: skip
    code, answer = server.post("/v1/chat/completions", payload)
    assert code == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"] and answer["error"]["param"] == param
    assert "Traceback" not in answer["error"]["message"]
    text, _, _ = ask(server, sample_media, stream=False, speech=False)
    assert text == expected[0]


def test_past_max_queue_a_request_gets_429(server, sample_media):
    """--max_queue 1: one request runs, one waits, a third is refused, whatever the timing."""
    long_request = body(max_tokens=64)
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(server.post("/v1/chat/completions", long_request)[0])) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes)[-1] == 429 and codes.count(200) >= 1
    code, answer = server.post("/v1/chat/completions", body())
    assert code == 200 and answer["choices"][0]["message"]["content"]


def test_speech_from_a_checkpoint_without_a_talker_is_refused(tiny_thinking, tmp_path):
    thinking = start_server(server_args(tiny_thinking), tmp_path)
    try:
        assert thinking.get("/health")["speech"] is False
        code, answer = thinking.post("/v1/chat/completions", body(modalities=["text", "audio"], audio={"voice": "Ethan"}))
        assert code == 400 and "has no talker" in answer["error"]["message"]
        code, answer = thinking.post("/v1/chat/completions", body())
        assert code == 200 and answer["choices"][0]["message"]["content"]
    finally:
        assert thinking.stop() == 0


# ----------------------------------------------------------------------------- a real browser


def browser():
    """Debian's headless Chromium, driven by its own chromedriver (never a downloaded one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000"):  # fmt: skip
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


def test_a_browser_asks_with_an_image_and_audio_then_follows_up(server, sample_media, expected, tiny_checkpoint,
                                                               reference, runtime_cpu, tmp_path):  # fmt: skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def bot_texts():
        return [e.text for e in page.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")
                if "component of type audio" not in (e.get_attribute("aria-label") or "")]  # fmt: skip

    def ask_in_page(question, files=()):
        if files:
            page.find_element(By.CSS_SELECTOR, "#question input[type=file]").send_keys("\n".join(map(str, files)))
            wait_for(lambda: len(page.find_elements(By.CSS_SELECTOR, "#question .thumbnail-item, #question img")) >= 1, 60)
        box = page.find_element(By.CSS_SELECTOR, "#question textarea")
        box.send_keys(question)
        box.send_keys(Keys.ENTER)

    page = browser()
    try:
        page.get(server.url)
        wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#question textarea"), 60)
        page.find_element(By.CSS_SELECTOR, "#speak input").click()
        ask_in_page(QUESTION, [sample_media["image"], sample_media["audio"]])
        players = "#chat [data-testid=bot] [data-testid=waveform-Audio]"
        wait_for(lambda: page.find_elements(By.CSS_SELECTOR, players))
        assert bot_texts() == [expected[0]]  # the reference's answer, with an audio player after it

        page.find_element(By.CSS_SELECTOR, "#speak input").click()  # text only for the follow-up
        ask_in_page("And now?")
        wait_for(lambda: len(bot_texts()) == 2 and bot_texts()[1])
        history = [{"role": "user", "content": [{"type": "image", "image": str(sample_media["image"])},
                                                {"type": "audio", "audio": str(sample_media["audio"])},
                                                {"type": "text", "text": QUESTION}]},
                   {"role": "assistant", "content": [{"type": "text", "text": expected[0]}]},
                   {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]  # fmt: skip
        follow_up = expected_answer(reference, tiny_checkpoint, history, NEW_TOKENS)[0]
        wait_for(lambda: bot_texts()[1] == follow_up, 60)  # answered with the first turn in its history
        screenshot = Path(os.environ.get("WEB_DEMO_SCREENSHOT", tmp_path / "web_demo.png"))
        page.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        page.quit()


# ----------------------------------------------------------------------------- msrun


@pytest.mark.parametrize("mode", ["zero3", "expert"])
def test_msrun_two_workers_answer_as_the_reference(mode, tiny_checkpoint, sample_media, expected, tmp_path):
    server = start_server(server_args(tiny_checkpoint, "--parallel", mode), tmp_path, msrun=True)
    try:
        health = server.get("/health")
        assert (health["parallel"], health["world_size"]) == (mode, 2)
        check_answers(server, sample_media, expected)
        code, answer = server.post("/v1/chat/completions", body(modalities=["text", "audio"], audio={"voice": "Bob"}))
        assert code == 400  # refused on rank 0: the workers never hear of it ...
        assert ask(server, sample_media, stream=False, speech=False)[0] == expected[0]  # ... and stay in step
        assert server.get("/health")["loads"] == 1
    finally:
        returncode = server.stop()
    assert returncode == 0
    for rank in (0, 1):
        assert "Traceback" not in server.worker_log(rank)


def test_a_worker_that_dies_mid_request_ends_the_server(tiny_checkpoint, tmp_path):
    server = start_server(server_args(tiny_checkpoint), tmp_path, msrun=True, cluster_time_out=30)
    try:
        thread = threading.Thread(target=lambda: server.post("/v1/chat/completions", body(max_tokens=400), timeout=120),
                                  daemon=True)  # its connection is cut when the server ends
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
