"""msrun with 2 CPU workers: a dead worker ends the job, and the outputs stay whole.

(That sampling ranks stay in step is tested per script, with expert parallelism: tests/test_<script>.py.)
"""

from __future__ import annotations

import json
import subprocess
import time

import psutil
import pytest

from tests.script_runs import calm_msrun, msrun_command, msrun_worker, script_env


@pytest.mark.slow
def test_a_dead_worker_ends_the_job_and_leaves_outputs_untouched(tiny_checkpoint, sample_media, tmp_path):
    out, log_dir = tmp_path / "out", tmp_path / "log"
    out.mkdir()
    previous = {"model": "earlier run", "text": "kept"}
    (out / "result.json").write_text(json.dumps(previous))
    cluster_time_out = 60
    args = [
        "--device_target",
        "CPU",
        "--model_name",
        str(tiny_checkpoint),
        "--audio",
        str(sample_media["audio"]),
        "--prompt",
        "hi",
        "--max_new_tokens",
        "400",
        "--output_dir",
        str(out),
        "--verbose",
    ]
    command = msrun_command("omni_understanding.py", args, log_dir, cluster_time_out=cluster_time_out)
    launch = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=script_env())
    calm_msrun(launch, log_dir)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until rank 1 is decoding
            log = log_dir / "worker_1.log"
            if log.exists() and "decode step 3" in log.read_text(errors="replace"):
                break
            time.sleep(1)
        else:
            pytest.fail("rank 1 never started decoding")
        victim = msrun_worker(launch.pid, 1)
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
