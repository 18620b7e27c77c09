"""scripts/demo.sh as a newcomer runs it: stdout is the answer and where the files are, nothing else."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.script_runs import ROOT, expected_answer, free_port

DEMO_QUESTION = "What can you see and hear? Answer in one short sentence."


@pytest.mark.slow
def test_the_demo_prints_the_reference_answer_and_the_file_paths_only(
    tiny_checkpoint, sample_media, reference, runtime_cpu, tmp_path
):
    out, logs = tmp_path / "demo", tmp_path / "demo_log"
    env = {
        **os.environ,
        "OUTPUT_DIR": str(out),
        "LOG_DIR": str(logs),
        "MASTER_PORT": str(free_port()),
        "TINY_CKPT": str(tiny_checkpoint),
        "SAMPLE_MEDIA": str(sample_media["image"].parent),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]

    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(sample_media["image"])},
                {"type": "audio", "audio": str(sample_media["audio"])},
                {"type": "text", "text": DEMO_QUESTION},
            ],
        }
    ]
    answer, _ = expected_answer(reference, tiny_checkpoint, conversation, new_tokens=16)
    assert done.stdout.splitlines() == [
        f"answer (tiny random weights, so meaningless words): {answer!r}",
        f"speech: {out / 'output.wav'}",
        f"result: {out / 'result.json'}",
    ]
    assert (out / "output.wav").stat().st_size > 0
    for rank in (0, 1):  # the workers' logs hold what msrun used to print, quieted (GLOG_v=3)
        log = (logs / f"worker_{rank}.log").read_text(errors="replace")
        assert "Failed to connect to the meta server" not in log and "Config not found for parakeet" not in log
