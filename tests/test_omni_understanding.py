"""omni_understanding.py end to end: one process and msrun with 2 workers, against the PyTorch reference;
one request, a --requests file in batches (interrupted and resumed), streaming, the Thinking checkpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import omni_understanding
from tests.script_runs import (
    ROOT,
    SAMPLING,
    TALKER_SAMPLING,
    WAV_TOLERANCE_EAGER,
    WAV_TOLERANCE_FLASH,
    Run,
    check_both_ranks_ran,
    check_expert_parallel_as_one_process,
    check_metrics,
    check_parallel,
    check_run,
    expected_answer,
    run_launcher,
    run_msrun,
    run_single,
    script_command,
    script_env,
)

NEW_TOKENS, TALKER_FRAMES = 8, 4
QUESTION = "What can you see and hear? Answer in one short sentence."


@pytest.fixture(scope="module")
def argv(tiny_checkpoint, sample_media):
    return [
        "--device_target",
        "CPU",
        "--model_name",
        str(tiny_checkpoint),
        "--image",
        str(sample_media["image"]),
        "--audio",
        str(sample_media["audio"]),
        "--prompt",
        QUESTION,
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--return_audio",
        "--talker_max_new_tokens",
        str(TALKER_FRAMES),
    ]


@pytest.fixture(scope="module")
def expected(argv, tiny_checkpoint, reference, runtime_cpu):
    (request,) = omni_understanding.build_requests(omni_understanding.parse_args(argv))
    return expected_answer(reference, tiny_checkpoint, request.conversation, NEW_TOKENS, TALKER_FRAMES)


def test_conversation_puts_media_before_the_question(argv, sample_media):
    (request,) = omni_understanding.build_requests(
        omni_understanding.parse_args(argv + ["--system_prompt", "Be brief."])
    )
    conversation = request.conversation
    assert [m["role"] for m in conversation] == ["system", "user"]
    assert [item["type"] for item in conversation[1]["content"]] == ["image", "audio", "text"]
    assert conversation[1]["content"][0]["image"] == str(sample_media["image"].resolve())


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["flash_attention_2", "eager"])  # the default (Ascend's path), and eager
def test_single_process_streams_the_reference_answer_and_nothing_else(attention, argv, expected, tiny_plan, tmp_path):
    run = run_single("omni_understanding.py", argv + ["--stream", "--attn_implementation", attention], tmp_path / "out")
    check_run(
        run, *expected, wav_tolerance=WAV_TOLERANCE_FLASH if attention == "flash_attention_2" else WAV_TOLERANCE_EAGER
    )
    assert run.stdout == expected[0] + "\n"  # stdout is the answer only, streamed piece by piece
    check_metrics(run, NEW_TOKENS, speech=True)
    check_parallel(run, tiny_plan, "none", with_talker=True)
    assert run.result["inputs"]["image"] and run.result["inputs"]["audio"]


@pytest.mark.slow
def test_the_launcher_on_two_workers_prints_the_reference_answer_alone(
    argv, expected, tiny_plan, tiny_checkpoint, tmp_path
):
    """scripts/run_omni_understanding.sh (msrun, 2 CPU workers, ZeRO-3): stdout is the answer, nothing else, and
    no process leaves a temporary folder behind (msrun's scheduler runs the script too)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = run_launcher(
        "run_omni_understanding.sh", argv, tmp_path / "out", MODEL_NAME=str(tiny_checkpoint), TMPDIR=str(scratch)
    )
    check_run(run, *expected)
    assert run.stdout == expected[0] + "\n" and run.stderr == ""
    assert not list(scratch.iterdir())
    check_both_ranks_ran(run)
    check_parallel(run, tiny_plan, "zero3", with_talker=True)  # the default under msrun


@pytest.mark.slow
def test_msrun_expert_parallel_samples_exactly_as_one_process(argv, tiny_plan, tmp_path):
    """Sampling on: the same logits and the same random stream must give the same tokens and codec codes."""
    check_expert_parallel_as_one_process(
        "omni_understanding.py", argv + SAMPLING + TALKER_SAMPLING, tiny_plan, True, tmp_path
    )


def copy_list(script: str) -> tuple[list[str], list[str]]:
    """The README's row for `script` in "what to copy": the paths to copy, and those left out ("except ...")."""
    section = (ROOT / "README.md").read_text().split("## Layout, and what to copy")[1].split("\n## ")[0]
    (row,) = [line for line in section.splitlines() if line.startswith(f"| `{script}` | ")]
    copied, left_out = [], []
    for part in row.split(" | ")[1].strip(" |").split(", "):
        named = re.findall(r"`([^`]+)`", part)
        copied.append(named[0])
        left_out += named[1:] if " except " in part else []
    return copied, left_out


@pytest.mark.slow
def test_the_script_runs_in_an_empty_folder_with_what_the_readme_says_to_copy(argv, expected, tmp_path):
    copied, left_out = copy_list("omni_understanding.py")
    assert "omni_helpers/" in copied and left_out == ["omni_helpers/serving/"]
    project = tmp_path / "my_project"
    for path in copied:
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        if path.endswith("/"):
            shutil.copytree(ROOT / path, project / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / path, project / path)
    for path in left_out:
        shutil.rmtree(project / path)
    environment = {name: value for name, value in script_env().items() if name != "PYTHONPATH"}  # nothing from here
    output_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "omni_understanding.py", *argv, "--output_dir", str(output_dir)],
        cwd=project,
        env=environment,
        capture_output=True,
        timeout=900,
    )
    check_run(Run(done.returncode, done.stdout.decode(), done.stderr.decode(), output_dir), *expected)


# ----------------------------------------------------------------------------- --requests


def mixed_requests(media: dict, short_audio) -> list[dict]:
    """Different lengths and modalities: text only; image + audio; a shorter audio; text; then a
    video with its soundtrack and an audio alone (a batch never mixes images and videos)."""

    def turn(*items):
        return [{"role": "user", "content": [*items, {"type": "text", "text": QUESTION}]}]

    return [
        {"id": "text", "conversation": turn()},
        {
            "id": "image+audio",
            "conversation": turn(
                {"type": "image", "image": str(media["image"])}, {"type": "audio", "audio": str(media["audio"])}
            ),
        },
        {"id": "short audio", "conversation": turn({"type": "audio", "audio": str(short_audio)})},
        {"id": "text again", "conversation": [{"role": "user", "content": "Describe the sound of a short sentence."}]},
        {
            "id": "video",
            "conversation": turn(
                {"type": "video", "video": str(media["video"]), "min_pixels": 64 * 64, "max_pixels": 64 * 64}
            ),
        },
        {"id": "audio", "conversation": turn({"type": "audio", "audio": str(media["audio"])})},
    ]


@pytest.fixture(scope="module")
def requests_file(sample_media, short_audio, tmp_path_factory):
    path = tmp_path_factory.mktemp("requests") / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed_requests(sample_media, short_audio)))
    return path


@pytest.fixture(scope="module")
def expected_lines(requests_file, tiny_checkpoint, reference, runtime_cpu):
    """Each request answered alone by the reference."""
    return [
        {
            "id": r["id"],
            "text": expected_answer(reference, tiny_checkpoint, r["conversation"], NEW_TOKENS)[0],
            "audio": None,
        }
        for r in map(json.loads, requests_file.read_text().splitlines())
    ]


def requests_argv(checkpoint, requests_file, batch_size: int) -> list[str]:
    return [
        "--device_target",
        "CPU",
        "--model_name",
        str(checkpoint),
        "--requests",
        str(requests_file),
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--batch_size",
        str(batch_size),
    ]


def results(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]


def answers_of(lines: list[dict]) -> list[dict]:
    return [{key: line[key] for key in ("id", "text", "audio")} for line in lines]


@pytest.mark.slow
def test_requests_in_batches_of_four_answer_each_as_the_reference_does_alone(
    tiny_checkpoint, requests_file, expected_lines, tmp_path
):
    run = run_single("omni_understanding.py", requests_argv(tiny_checkpoint, requests_file, 4), tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = results(run.output_dir)
    assert answers_of(lines) == expected_lines  # one line per request, in input order
    assert [line["metrics"]["batch_size"] for line in lines] == [4, 4, 4, 4, 2, 2]
    assert run.stdout == "".join(f"{line['id']}: {line['text']}\n" for line in expected_lines)


@pytest.mark.slow
def test_requests_in_one_batch_each_speak_their_own_answer(
    tiny_checkpoint, sample_media, short_audio, reference, tmp_path
):
    """--return_audio with --batch_size 3: results.jsonl names each row's WAV, and each is the speech the reference
    gives that request alone (text; image + audio; a greeting, whose speech the tiny talker makes differently)."""
    import soundfile as sf

    frames = 8  # the greeting's codes part from the others' at the fourth frame
    greeting = {"id": "hi", "conversation": [{"role": "user", "content": "Hi"}]}
    requests = mixed_requests(sample_media, short_audio)[:2] + [greeting]
    path = tmp_path / "speech.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    argv = requests_argv(tiny_checkpoint, path, 3) + ["--return_audio", "--talker_max_new_tokens", str(frames)]
    run = run_single("omni_understanding.py", argv, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = results(run.output_dir)
    assert [line["metrics"]["batch_size"] for line in lines] == [3, 3, 3]
    assert len({line["audio"] for line in lines}) == 3
    expected = [expected_answer(reference, tiny_checkpoint, r["conversation"], NEW_TOKENS, frames) for r in requests]
    assert np.abs(expected[2][1] - expected[0][1]).max() > 10 * WAV_TOLERANCE_FLASH  # rows told apart
    for line, (text, wav) in zip(lines, expected, strict=True):
        written, rate = sf.read(line["audio"], dtype="float32")
        assert (line["text"], rate, len(written)) == (text, 24000, len(wav)), line["id"]
        assert np.abs(written - wav).max() <= WAV_TOLERANCE_FLASH, line["id"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3", "expert"])
def test_msrun_requests_in_batches_match_the_reference(tiny_checkpoint, requests_file, expected_lines, mode, tmp_path):
    run = run_msrun(
        "omni_understanding.py",
        requests_argv(tiny_checkpoint, requests_file, 4) + ["--parallel", mode],
        tmp_path / "out",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert answers_of(results(run.output_dir)) == expected_lines
    assert {line["metrics"]["parallel"] for line in results(run.output_dir)} == {mode}


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_finished_lines_and_resume_finishes_it(
    tiny_checkpoint, requests_file, expected_lines, tmp_path
):
    out = tmp_path / "out"
    argv = requests_argv(tiny_checkpoint, requests_file, 2) + ["--max_new_tokens", "48", "--output_dir", str(out)]
    launch = subprocess.Popen(
        script_command("omni_understanding.py", argv),
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not ((out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 2):
            assert launch.poll() is None and time.time() < deadline, "the run ended before its first batch was filed"
            time.sleep(0.02)
        launch.kill()  # during the second batch
    finally:
        launch.kill()
        launch.wait()
    first = results(out)
    assert [line["id"] for line in first] == ["text", "image+audio"]  # whole lines, the first batch only

    resumed = run_single("omni_understanding.py", argv[:-2] + ["--resume"], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(out)[:2] == first  # kept as they were, not generated again
    assert "image+audio:" not in resumed.stdout and "short audio:" in resumed.stdout

    uninterrupted = run_single("omni_understanding.py", argv[:-2], tmp_path / "whole")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert answers_of(results(out)) == answers_of(results(tmp_path / "whole"))


@pytest.mark.slow
def test_the_thinking_checkpoint_answers_text_as_its_reference_does(
    tiny_thinking, sample_media, references, runtime_cpu, tmp_path
):
    argv = [
        "--device_target",
        "CPU",
        "--model_name",
        str(tiny_thinking),
        "--image",
        str(sample_media["image"]),
        "--prompt",
        QUESTION,
        "--max_new_tokens",
        str(NEW_TOKENS),
    ]
    (request,) = omni_understanding.build_requests(omni_understanding.parse_args(argv))
    expected_text, _ = expected_answer(references(tiny_thinking), tiny_thinking, request.conversation, NEW_TOKENS)
    run = run_single("omni_understanding.py", argv, tmp_path / "out")
    check_run(run, expected_text, None)
