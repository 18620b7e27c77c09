"""msrun with 2 CPU workers: sampling ranks stay in step, a dead worker ends the job, outputs stay whole."""

from __future__ import annotations

import json
import re
import subprocess
import time

import psutil
import pytest

from tests.script_runs import msrun_command, run_msrun, script_env

RANK_LINE = re.compile(r"^\[rank (\d)/2\] (text: .*)$", re.MULTILINE)


def rank_lines(run, rank: int) -> list[str]:
    return [line for r, line in RANK_LINE.findall(run.worker_log(rank)) if int(r) == rank]


def sampling_args(ckpt, media):
    common = ["--device_target", "CPU", "--model_name", str(ckpt), "--max_new_tokens", "8", "--do_sample",
              "--temperature", "1.5", "--top_k", "50", "--top_p", "1.0", "--seed", "7"]  # fmt: skip
    speech = ["--return_audio", "--talker_do_sample", "--talker_max_new_tokens", "4"]
    return {
        "omni_understanding.py": common + ["--image", str(media["image"]), "--prompt", "What is it?", *speech],
        "audio_captioning.py": common + ["--audio", str(media["audio"])],
        "video_understanding.py": common + ["--video", str(media["video"]), "--prompt", "What happens?", *speech],
    }


@pytest.mark.parametrize("script", ["omni_understanding.py", "audio_captioning.py", "video_understanding.py"])
def test_sampling_ranks_take_identical_steps(script, tiny_checkpoint, sample_media, tmp_path):
    run = run_msrun(script, sampling_args(tiny_checkpoint, sample_media)[script], tmp_path / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = rank_lines(run, 0), rank_lines(run, 1)
    assert first and first == second  # same text and, with speech, the same samples
    if "--return_audio" in sampling_args(tiny_checkpoint, sample_media)[script]:
        assert "speech: none" not in first[0]


def _worker(msrun: psutil.Process, rank: int) -> psutil.Process | None:
    for child in msrun.children(recursive=True):
        try:
            if child.environ().get("RANK_ID") == str(rank) and child.environ().get("MS_ROLE") == "MS_WORKER":
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_dead_worker_ends_the_job_and_leaves_outputs_untouched(tiny_checkpoint, sample_media, tmp_path):
    out, log_dir = tmp_path / "out", tmp_path / "log"
    out.mkdir()
    previous = {"model": "earlier run", "text": "kept"}
    (out / "result.json").write_text(json.dumps(previous))
    cluster_time_out = 60
    args = [
        "--device_target", "CPU", "--model_name", str(tiny_checkpoint), "--audio", str(sample_media["audio"]),
        "--prompt", "hi", "--max_new_tokens", "400", "--output_dir", str(out),
    ]  # fmt: skip
    command = msrun_command("omni_understanding.py", args, log_dir, cluster_time_out=cluster_time_out)
    launch = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until rank 1 is decoding
            log = log_dir / "worker_1.log"
            if log.exists() and "==> sampling, step: 3" in log.read_text(errors="replace"):
                break
            time.sleep(1)
        else:
            pytest.fail("rank 1 never started decoding")
        victim = _worker(psutil.Process(launch.pid), 1)
        assert victim is not None
        victim.kill()
        killed_at = time.time()
        returncode = launch.wait(timeout=cluster_time_out + 120)
        assert returncode != 0
        assert time.time() - killed_at < cluster_time_out + 60
    finally:
        if launch.poll() is None:
            for child in psutil.Process(launch.pid).children(recursive=True):
                child.kill()
            launch.kill()
    assert json.loads((out / "result.json").read_text()) == previous  # the earlier result is untouched
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]  # and nothing partial was added
