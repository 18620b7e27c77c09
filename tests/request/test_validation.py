"""Bad requests: one line on stderr naming the input and the fix, exit code 2, before any weights load.

The scripts point at a copy of the tiny checkpoint whose weights file is garbage: had any
script tried to load weights, it would fail with a traceback instead of the message. A
rejected request must not even import MindSpore: it answers in about a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.script_runs import run_msrun, run_single


@pytest.fixture(scope="module")
def media(sample_media, tmp_path_factory):
    """The sample media plus broken and silent variants."""
    folder = tmp_path_factory.mktemp("bad_media")
    paths = {name: str(path) for name, path in sample_media.items()}
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken_wav.wav").write_bytes(b"RIFF0000WAVEfmt garbage")
    video = sample_media["video"].read_bytes()
    (folder / "truncated.mp4").write_bytes(video[: len(video) // 8])
    silent = folder / "silent.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(sample_media["video"]), "-an", "-c:v", "copy", str(silent)],
        check=True,
    )
    (folder / "bad.json").write_text('[{"role": "user", "content": [')
    (folder / "unknown_type.json").write_text(
        json.dumps([{"role": "user", "content": [{"type": "smell", "smell": "x"}]}])
    )
    (folder / "missing_field.json").write_text(json.dumps([{"role": "user", "content": [{"type": "image"}]}]))
    (folder / "no_role.json").write_text(json.dumps([{"content": "hi"}]))
    (folder / "batch.json").write_text(
        json.dumps([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]])
    )
    (folder / "twice.jsonl").write_text('{"id": "a", "conversation": [{"role": "user", "content": "hi"}]}\n' * 2)
    (folder / "bad_line.jsonl").write_text(
        '{"id": "a", "conversation": [{"role": "user", "content": "hi"}]}\n{"id": \n'
    )
    (folder / "empty.jsonl").write_text("\n")
    (folder / "two.jsonl").write_text(
        '{"id": "a", "conversation": [{"role": "user", "content": "hi"}]}\n'
        '{"id": "b", "conversation": [{"role": "user", "content": "yo"}]}\n'
    )
    (folder / "url.json").write_text(
        json.dumps([{"role": "user", "content": [{"type": "image", "image": "http://127.0.0.1:9/cars.jpg"}]}])
    )
    (folder / "bad_data.json").write_text(
        json.dumps([{"role": "user", "content": [{"type": "audio", "audio": "data:audio/wav;base64,@@@"}]}])
    )
    paths.update({p.stem: str(p) for p in folder.iterdir()})
    paths["folder"] = str(folder)
    return paths


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Copies of the tiny checkpoint: weights unreadable; without a talker; pickle-only; without config."""
    root = tmp_path_factory.mktemp("bad_ckpts")

    def copy(name):
        target = root / name
        shutil.copytree(tiny_checkpoint, target)
        (target / "model.safetensors").write_bytes(b"not weights")
        return target

    no_load = copy("no_load")
    no_talker = copy("no_talker")
    config = json.loads((no_talker / "config.json").read_text())
    config["enable_audio_output"] = False
    (no_talker / "config.json").write_text(json.dumps(config))
    pickle_only = copy("pickle_only")
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    no_config = copy("no_config")
    (no_config / "config.json").unlink()
    captioner = copy("no_load_captioner")  # named as the released Captioner is
    config["enable_audio_output"] = False
    (captioner / "config.json").write_text(json.dumps(config))
    return {
        "no_load": str(no_load),
        "no_talker": str(no_talker),
        "pickle_only": str(pickle_only),
        "no_config": str(no_config),
        "captioner": str(captioner),
        "missing": str(root / "does_not_exist"),
    }


OMNI, CAPTION, VIDEO = "omni_understanding.py", "audio_captioning.py", "video_understanding.py"

# (id, script, arguments with {placeholders}, words the message must contain)
CASES = [
    ("missing image", OMNI, "--image {folder}/nope.png --prompt hi", ["nope.png", "no such file"]),
    ("broken image", OMNI, "--image {broken} --prompt hi", ["broken.png", "not a readable image"]),
    ("broken audio", OMNI, "--audio {broken_wav} --prompt hi", ["broken_wav.wav", "no decodable audio"]),
    ("truncated video", OMNI, "--video {truncated} --prompt hi", ["truncated.mp4", "no decodable video"]),
    ("empty request", OMNI, "", ["empty request"]),
    ("unknown speaker", OMNI, "--prompt hi --return_audio --speaker Bob", ["--speaker Bob", "aiden, chelsie, ethan"]),
    (
        "audio from a model without talker",
        OMNI,
        "--model_name {no_talker} --prompt hi --return_audio",
        ["no talker", "drop --return_audio"],
    ),
    (
        "min above max pixels",
        OMNI,
        "--prompt hi --min_pixels 5000 --max_pixels 100",
        ["--min_pixels 5000", "--max_pixels 100"],
    ),
    ("zero new tokens", OMNI, "--prompt hi --max_new_tokens 0", ["--max_new_tokens 0", "positive"]),
    (
        "more tokens than the context holds",
        OMNI,
        "--prompt hi --max_new_tokens 40000",
        ["--max_new_tokens 40000", "thinker's context holds 32768 positions", "ask for at most 32768"],
    ),
    (
        "more speech than the talker's context",
        OMNI,
        "--prompt hi --return_audio --talker_max_new_tokens 40000",
        ["--talker_max_new_tokens 40000", "talker's context holds 32768 positions"],
    ),
    (
        "negative talker tokens",
        OMNI,
        "--prompt hi --return_audio --talker_max_new_tokens -1",
        ["--talker_max_new_tokens -1"],
    ),
    ("model dir missing", OMNI, "--model_name {missing} --prompt hi", ["does_not_exist", "no such directory"]),
    ("model dir without config", OMNI, "--model_name {no_config} --prompt hi", ["no config.json"]),
    ("pickle weights", OMNI, "--model_name {pickle_only} --prompt hi", ["pytorch_model.bin", "--allow_pickle_weights"]),
    (
        "hub id not downloaded",
        OMNI,
        "--model_name Qwen/Qwen3-Omni-30B-A3B-Instruct --prompt hi",
        ["not in the local cache", "huggingface-cli download Qwen/Qwen3-Omni-30B-A3B-Instruct", "modelscope download"],
    ),
    ("no NPU here", OMNI, "--device_target Ascend --prompt hi", ["no Ascend NPU", "--device_target CPU"]),
    ("conversation not JSON", OMNI, "--conversation {bad}", ["bad.json", "not valid JSON"]),
    ("conversation unknown type", OMNI, "--conversation {unknown_type}", ["unknown type 'smell'"]),
    (
        "conversation item without field",
        OMNI,
        "--conversation {missing_field}",
        ["image item without its 'image' field"],
    ),
    ("conversation message without role", OMNI, "--conversation {no_role}", ["needs a 'role'"]),
    ("several conversations at once", OMNI, "--conversation {batch}", ["several conversations", "--requests"]),
    ("conversation file missing", OMNI, "--conversation {folder}/none.json", ["none.json", "no such file"]),
    (
        "images and videos together",
        OMNI,
        "--image {image} --video {video} --prompt hi",
        ["images and videos in one request", "separate requests"],
    ),
    (
        "conversation and flags",
        OMNI,
        "--conversation {missing_field} --prompt hi --image {image}",
        ["--conversation replaces --prompt, --image", "not both"],
    ),
    ("unreachable URL", OMNI, "--conversation {url}", ["http://127.0.0.1:9/cars.jpg", "cannot be fetched"]),
    ("corrupt data URL", OMNI, "--conversation {bad_data}", ["base64 data is corrupt"]),
    ("requests with a repeated id", OMNI, "--requests {twice}", ["twice.jsonl line 2", "id 'a' is used twice"]),
    ("requests line not JSON", OMNI, "--requests {bad_line}", ["bad_line.jsonl line 2", "not valid JSON"]),
    ("requests file empty", OMNI, "--requests {empty}", ["no requests"]),
    (
        "sampled speech with top-p past 1",
        OMNI,
        "--prompt hi --return_audio --talker_do_sample --talker_top_p 1.5",
        ["--talker_top_p 1.5", "(0, 1]"],
    ),
    (
        "speech without repetition penalty",
        OMNI,
        "--prompt hi --return_audio --talker_repetition_penalty 0",
        ["1.0: none"],
    ),
    ("streaming a batch", OMNI, "--prompt hi --stream --batch_size 3", ["--stream", "--batch_size 1"]),
    ("captioning without audio", CAPTION, "", ["no audio", "--audio"]),
    ("captioning a missing file", CAPTION, "--audio {folder}/gone.wav", ["gone.wav", "no such file"]),
    ("captioning a broken file", CAPTION, "--audio {audio} --audio {broken_wav}", ["broken_wav.wav"]),
    ("captioning zero tokens", CAPTION, "--audio {audio} --max_new_tokens -3", ["--max_new_tokens -3"]),
    (
        "captioning past the context",
        CAPTION,
        "--audio {audio} --max_new_tokens 99999",
        ["--max_new_tokens 99999", "32768"],
    ),
    ("captioning a file twice", CAPTION, "--audio {audio} --audio {audio}", ["given twice"]),
    (
        "Captioner with a prompt",
        CAPTION,
        "--model_name {captioner} --audio {audio} --prompt hi",
        ["is the Captioner", "without --prompt"],
    ),
    (
        "Captioner asked about an image",
        OMNI,
        "--model_name {captioner} --image {image}",
        ["is the Captioner", "exactly one audio"],
    ),
    (
        "video without audio track",
        VIDEO,
        "--video {silent} --prompt hi",
        ["silent.mp4", "no audio track", "--no-use_audio_in_video"],
    ),
    ("video script without video", VIDEO, "--prompt hi", ["no video", "--video"]),
    ("video missing", VIDEO, "--video {folder}/gone.mp4 --prompt hi", ["gone.mp4", "no such file"]),
    (
        "video with unknown speaker",
        VIDEO,
        "--video {video} --prompt hi --return_audio --speaker Zed",
        ["--speaker Zed"],
    ),
    (
        "video range backwards",
        VIDEO,
        "--video {video} --prompt hi --video_start 5 --video_end 2",
        ["video_end 2.0 is not after video_start 5.0"],
    ),
    (
        "video start past its end",
        VIDEO,
        "--video {video} --prompt hi --video_start 5",
        ["video_start 5.0 is past the end of the clip (2.00 s)"],
    ),
    ("video start negative", VIDEO, "--video {video} --prompt hi --video_start -1", ["video_start -1.0 is negative"]),
    ("video fps zero", VIDEO, "--video {video} --prompt hi --fps 0", ["fps 0.0 must be positive"]),
    (
        "video start exactly at its end",
        VIDEO,
        "--video {video} --prompt hi --video_start 2",
        ["video_start 2.0 is past the end of the clip (2.00 s)"],
    ),
    (
        "video range past its end with one frame inside",
        VIDEO,
        "--video {video} --prompt hi --video_start 1.9 --video_end 5",
        ["fewer than 2 frames"],
    ),
    (
        "video range under two frames",
        VIDEO,
        "--video {video} --prompt hi --video_start 1 --video_end 1.1",
        ["fewer than 2 frames"],
    ),
    (
        "video conversation and flags",
        VIDEO,
        "--conversation {missing_field} --video {video}",
        ["--conversation replaces --video"],
    ),
]


@pytest.fixture(scope="module")
def heavy_imports_fail(tmp_path_factory) -> str:
    """A PYTHONPATH under which importing MindSpore, mindone, torch or torchvision raises:
    a request rejected before those imports (so in about a second, not tens) never notices."""
    from tests.script_runs import ROOT

    folder = tmp_path_factory.mktemp("heavy_imports_fail")
    for package in ("mindspore", "mindone", "torch", "torchvision"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text(
            f"raise ImportError('{package} imported before the request was checked')\n"
        )
    return f"{folder}:{ROOT}"


def expand(template: str, media: dict, checkpoints: dict) -> list[str]:
    values = {**media, **checkpoints}
    return template.format(**values).split()


@pytest.mark.parametrize("script,template,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_exits_2_with_one_line_before_loading(
    script, template, words, media, checkpoints, heavy_imports_fail, tmp_path
):
    args = expand(template, media, checkpoints)
    if "--model_name" not in args:
        args = ["--model_name", checkpoints["no_load"], *args]
    if "--device_target" not in args:
        args = ["--device_target", "CPU", *args]
    out = tmp_path / "out"
    run = run_single(script, args, out, PYTHONPATH=heavy_imports_fail)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0]
    assert not out.exists()  # nothing written


def test_relative_media_paths_in_a_conversation_file_are_taken_from_its_folder(sample_media, tmp_path):
    import omni_understanding

    folder = tmp_path / "request"
    folder.mkdir()
    shutil.copy(sample_media["image"], folder / "photo.png")
    (folder / "ask.json").write_text(
        json.dumps([{"role": "user", "content": [{"type": "image", "image": "photo.png"}]}])
    )
    args = omni_understanding.parse_args(["--conversation", str(folder / "ask.json")])
    (request,) = omni_understanding.build_requests(args)  # built from another working directory
    assert request.conversation[0]["content"][0]["image"] == str((folder / "photo.png").resolve())


@pytest.mark.parametrize(
    "launcher",
    ["msrun_launch.sh", "run_omni_understanding.sh", "run_audio_captioning.sh", "run_video_understanding.sh"],
)
def test_launchers_without_arguments_print_their_usage_and_exit_2(launcher):
    from tests.script_runs import ROOT

    done = subprocess.run(["bash", str(ROOT / "scripts" / launcher)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("usage: ") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_launcher_shows_a_bad_requests_error_alone_and_exits_2(checkpoints, tmp_path):
    from tests.script_runs import run_launcher

    args = ["--device_target", "CPU", "--prompt", "hi", "--return_audio", "--speaker", "Bob"]
    run = run_launcher("run_omni_understanding.sh", args, tmp_path / "out", MODEL_NAME=checkpoints["no_load"])
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "error: --speaker Bob: not in this checkpoint; choose one of aiden, chelsie, ethan\n"


@pytest.mark.slow
def test_under_msrun_the_first_rank_to_check_ends_the_job_with_code_2(media, checkpoints, tmp_path):
    run = run_msrun(
        OMNI,
        ["--device_target", "CPU", "--model_name", checkpoints["no_load"], "--image", media["broken"]],
        tmp_path / "out",
    )
    assert run.returncode != 0
    # Every rank checks the request first. msrun stops the other workers as soon as one exits
    # non-zero, so a slower rank may be stopped before it prints: the first to finish must have
    # exited with code 2 and the one-line error, and no rank may show a traceback.
    assert "exit with exception. Error code: 2." in run.stderr + run.stdout
    logs = [run.worker_log(rank) for rank in (0, 1)]
    assert any("error: image" in log and "not a readable image" in log for log in logs)
    assert all("Traceback" not in log for log in logs)


def checked_seconds(conversation, checkpoint_path, folder, use_audio_in_video: bool) -> dict:
    """The seconds of audio and video `check_requests` counts for one request."""
    from omni_helpers.request.checkpoint import resolve_checkpoint
    from omni_helpers.request.request_files import Request
    from omni_helpers.request.settings import GenerationSettings
    from omni_helpers.request.validation import check_requests

    settings = GenerationSettings(use_audio_in_video=use_audio_in_video)
    checkpoint = resolve_checkpoint(str(checkpoint_path))
    (request,) = check_requests([Request("r", conversation)], checkpoint, settings, folder)
    return request.media_seconds


def test_a_requests_media_seconds_count_its_ranges_and_heard_soundtracks_each_clip_probed_once(
    sample_media, tiny_checkpoint, tmp_path, monkeypatch
):
    """check_requests: each clip's `<kind>_start`/`<kind>_end` range within it (the sample audio is 2.5 s, the video
    2 s); a video heard with its soundtrack counts as audio too. The seconds come from the check's own probe: a
    video is probed by ffprobe once (70 ms a file here), not again to count its seconds."""
    from omni_helpers.request import media

    audio, video = str(sample_media["audio"]), str(sample_media["video"])
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": audio},
                {"type": "audio", "audio": audio, "audio_start": 1.0},
                {"type": "video", "video": video, "video_start": 0.5, "video_end": 9.0},
            ],
        }
    ]
    probed = []
    monkeypatch.setattr(media, "probe", lambda path, probe=media.probe: probed.append(path) or probe(path))
    seconds = checked_seconds(conversation, tiny_checkpoint, tmp_path, use_audio_in_video=False)
    assert seconds == pytest.approx({"audio": 4.0, "video": 1.5}) and [str(path) for path in probed] == [video]
    seconds = checked_seconds(conversation, tiny_checkpoint, tmp_path, use_audio_in_video=True)
    assert seconds == pytest.approx({"audio": 5.5, "video": 1.5})


def test_the_servers_request_limits_are_checked_and_must_be_positive():
    from omni_helpers.request.errors import RequestError
    from omni_helpers.request.validation import RequestLimits, check_request_seconds, check_request_size

    limits = RequestLimits(audio_seconds=4, video_seconds=1.5, media_items=2, turns=2)
    check_request_seconds({"audio": 4.0, "video": 1.5}, limits)  # at the limits: accepted
    with pytest.raises(RequestError, match=r"4\.1 s of audio .* limit of 4 \(its --max_audio_seconds\)"):
        check_request_seconds({"audio": 4.1, "video": 0.0}, limits)
    image = {"type": "image", "image": "a.png"}
    check_request_size([{"role": "user", "content": [image, image]}], limits)
    with pytest.raises(RequestError, match=r"3 images, audio and video items .* \(its --max_media_items\)"):
        check_request_size([{"role": "user", "content": [image, image, image]}], limits)
    with pytest.raises(RequestError, match=r"3 messages .* limit of 2 \(its --max_turns\)"):
        check_request_size([{"role": "user", "content": "hi"}] * 3, limits)
    with pytest.raises(RequestError, match="--max_turns 0: must be positive"):
        RequestLimits(turns=0).check()


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3", ".m4a"])
def test_an_audio_files_length_is_read_in_process_as_ffprobe_reads_it(suffix, sample_media, tmp_path):
    """libsndfile reads WAV, FLAC and MP3 headers in-process; AAC it cannot, and ffprobe answers for it."""
    from omni_helpers.request.media import probe, probe_audio

    audio = tmp_path / f"clip{suffix}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(sample_media["audio"]), str(audio)], check=True)
    ours, theirs = probe_audio(audio), probe(audio)
    assert ours.streams == theirs.streams == ("audio",)
    # ffprobe counts an MP3's encoder padding (a few 1152-sample frames), libsndfile leaves it out
    assert ours.duration == pytest.approx(theirs.duration, abs=0.1)


def test_a_broken_audio_file_is_probed_by_ffprobe_and_found_empty(media):
    from pathlib import Path

    from omni_helpers.request.media import probe_audio

    assert probe_audio(Path(media["broken_wav"])).streams == ()


def test_a_requests_audio_seconds_are_counted_without_ffprobe(sample_media, tiny_checkpoint, tmp_path, monkeypatch):
    """The server checks each request's audio seconds before queuing it: a WAV's are read in-process (ffprobe, a
    process of its own, took 70 ms a file there), so a server without ffprobe on its PATH still counts them."""
    import shutil as shutil_module

    from omni_helpers.request.errors import RequestError

    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": str(sample_media["audio"]), "audio_end": 2.0}]}
    ]
    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    assert checked_seconds(conversation, tiny_checkpoint, tmp_path, False) == {"audio": 2.0, "video": 0.0}
    video = [{"role": "user", "content": [{"type": "video", "video": str(sample_media["video"])}]}]
    with pytest.raises(RequestError, match="ffprobe"):  # a video's are ffprobe's to read
        checked_seconds(video, tiny_checkpoint, tmp_path, True)
