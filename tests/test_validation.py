"""Bad requests: one line on stderr naming the input and the fix, exit code 2, before any weights load.

The scripts point at a copy of the tiny checkpoint whose weights file is garbage: had any
script tried to load weights, it would fail with a traceback instead of the message.
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
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(sample_media["video"]), "-an", "-c:v", "copy", str(silent)], check=True)
    (folder / "bad.json").write_text("[{\"role\": \"user\", \"content\": [")
    (folder / "unknown_type.json").write_text(json.dumps([{"role": "user", "content": [{"type": "smell", "smell": "x"}]}]))
    (folder / "missing_field.json").write_text(json.dumps([{"role": "user", "content": [{"type": "image"}]}]))
    (folder / "no_role.json").write_text(json.dumps([{"content": "hi"}]))
    (folder / "batch.json").write_text(json.dumps([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]))
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
    return {"no_load": str(no_load), "no_talker": str(no_talker), "pickle_only": str(pickle_only),
            "no_config": str(no_config), "missing": str(root / "does_not_exist")}  # fmt: skip


OMNI, CAPTION, VIDEO = "omni_understanding.py", "audio_captioning.py", "video_understanding.py"

# (id, script, arguments with {placeholders}, words the message must contain)
CASES = [
    ("missing image", OMNI, "--image {folder}/nope.png --prompt hi", ["nope.png", "no such file"]),
    ("broken image", OMNI, "--image {broken} --prompt hi", ["broken.png", "not a readable image"]),
    ("broken audio", OMNI, "--audio {broken_wav} --prompt hi", ["broken_wav.wav", "no decodable audio"]),
    ("truncated video", OMNI, "--video {truncated} --prompt hi", ["truncated.mp4", "no decodable video"]),
    ("empty request", OMNI, "", ["empty request"]),
    ("unknown speaker", OMNI, "--prompt hi --return_audio --speaker Bob", ["--speaker Bob", "aiden, chelsie, ethan"]),
    ("audio from a model without talker", OMNI, "--model_name {no_talker} --prompt hi --return_audio", ["no talker", "drop --return_audio"]),
    ("min above max pixels", OMNI, "--prompt hi --min_pixels 5000 --max_pixels 100", ["--min_pixels 5000", "--max_pixels 100"]),
    ("zero new tokens", OMNI, "--prompt hi --max_new_tokens 0", ["--max_new_tokens 0", "positive"]),
    ("negative talker tokens", OMNI, "--prompt hi --return_audio --talker_max_new_tokens -1", ["--talker_max_new_tokens -1"]),
    ("model dir missing", OMNI, "--model_name {missing} --prompt hi", ["does_not_exist", "no such directory"]),
    ("model dir without config", OMNI, "--model_name {no_config} --prompt hi", ["no config.json"]),
    ("pickle weights", OMNI, "--model_name {pickle_only} --prompt hi", ["pytorch_model.bin", "--allow_pickle_weights"]),
    ("conversation not JSON", OMNI, "--conversation {bad}", ["bad.json", "not valid JSON"]),
    ("conversation unknown type", OMNI, "--conversation {unknown_type}", ["unknown type 'smell'"]),
    ("conversation item without field", OMNI, "--conversation {missing_field}", ["image item without its 'image' field"]),
    ("conversation message without role", OMNI, "--conversation {no_role}", ["needs a 'role'"]),
    ("several conversations at once", OMNI, "--conversation {batch} --return_audio", ["several conversations"]),
    ("conversation file missing", OMNI, "--conversation {folder}/none.json", ["none.json", "no such file"]),
    ("captioning without audio", CAPTION, "", ["no audio", "--audio"]),
    ("captioning a missing file", CAPTION, "--audio {folder}/gone.wav", ["gone.wav", "no such file"]),
    ("captioning a broken file", CAPTION, "--audio {audio} --audio {broken_wav}", ["broken_wav.wav"]),
    ("captioning zero tokens", CAPTION, "--audio {audio} --max_new_tokens -3", ["--max_new_tokens -3"]),
    ("video without audio track", VIDEO, "--video {silent} --prompt hi", ["silent.mp4", "no audio track", "--no-use_audio_in_video"]),
    ("video script without video", VIDEO, "--prompt hi", ["no video", "--video"]),
    ("video missing", VIDEO, "--video {folder}/gone.mp4 --prompt hi", ["gone.mp4", "no such file"]),
    ("video with unknown speaker", VIDEO, "--video {video} --prompt hi --return_audio --speaker Zed", ["--speaker Zed"]),
]


def expand(template: str, media: dict, checkpoints: dict) -> list[str]:
    values = {**media, **checkpoints}
    return template.format(**values).split()


@pytest.mark.parametrize("script,template,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_exits_2_with_one_line_before_loading(script, template, words, media, checkpoints, tmp_path):
    args = expand(template, media, checkpoints)
    if "--model_name" not in args:
        args = ["--model_name", checkpoints["no_load"], *args]
    out = tmp_path / "out"
    run = run_single(script, ["--device_target", "CPU", *args], out)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0]
    assert not out.exists()  # nothing written


def test_under_msrun_the_first_rank_to_check_ends_the_job_with_code_2(media, checkpoints, tmp_path):
    run = run_msrun(OMNI, ["--device_target", "CPU", "--model_name", checkpoints["no_load"], "--image", media["broken"]], tmp_path / "out")
    assert run.returncode != 0
    # Every rank checks the request first. msrun stops the other workers as soon as one exits
    # non-zero, so a slower rank may be stopped before it prints: the first to finish must have
    # exited with code 2 and the one-line error, and no rank may show a traceback.
    assert "exit with exception. Error code: 2." in run.stderr + run.stdout
    logs = [run.worker_log(rank) for rank in (0, 1)]
    assert any("error: image" in log and "not a readable image" in log for log in logs)
    assert all("Traceback" not in log for log in logs)
