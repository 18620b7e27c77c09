"""scripts/bench_serve.py against web_demo.py (one process, the tiny checkpoint) and against the transformers
reference it serves itself: every request answered at every concurrency, each answer the same whatever the
concurrency (greedy rows answer as alone), the same as the reference's, and the figures worked out from what
each client saw."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.script_runs import ROOT, script_env
from tests.server_runs import start_server

pytestmark = pytest.mark.slow


def test_the_server_and_the_reference_answer_every_request_alike_at_every_concurrency(
    tiny_checkpoint, sample_media, tmp_path
):
    server = start_server(
        ["--device_target", "CPU", "--model_name", str(tiny_checkpoint), "--max_queue", "8"], tmp_path
    )
    try:
        out = tmp_path / "bench_serve.json"
        command = [
            sys.executable,
            str(ROOT / "scripts" / "bench_serve.py"),
            "--url",
            server.url,
            "--media_dir",
            str(sample_media["image"].parent),
            "--concurrency",
            "1",
            "3",
            "--requests",
            "6",
            "--max_tokens",
            "6",
            "--talker_frames",
            "6",
            "--reference_model",
            str(tiny_checkpoint),
            "--json",
            str(out),
        ]
        run = subprocess.run(command, capture_output=True, text=True, env=script_env(), timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        batches = server.get("/health")["largest_batch"]
    finally:
        assert server.stop() == 0
    report = json.loads(out.read_text())
    runs = {(r["server"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(s, c) for s in ("mindspore", "reference") for c in (1, 3)}
    answers = {}
    for key, run_ in runs.items():
        assert run_["failed"] == 0 and len(run_["requests"]) == 6, key
        for i, sent in enumerate(run_["requests"]):
            assert sent["status"] == 200 and sent["error"] is None and sent["output_tokens"] > 0, (key, i)
            assert sent["first_token"] is not None and 0 < sent["first_token"] <= sent["total"]
            if sent["speech"]:
                assert sent["audio_seconds"] > 0 and sent["first_audio"] is not None
            answers.setdefault(i, set()).add("".join(sent["texts"]))
        assert run_["output_tokens_per_second"] > 0 and run_["real_time_factor_p50"] > 0
    assert all(len(texts) == 1 for texts in answers.values()), answers  # alike on both servers, at both concurrencies
    assert batches > 1  # at concurrency 3 some requests shared a batch
    table = run.stdout.splitlines()
    assert table[-5].split()[:2] == ["server", "concurrency"] and len(table[-4:]) == 4
