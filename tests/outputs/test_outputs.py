"""Outputs are written whole or not at all, with the mode the user's umask gives, and a
results file survives an interrupted run."""

from __future__ import annotations

import json
import os
import stat

import numpy as np

from omni_helpers.outputs.files import ResultsFile, save_result


def test_files_get_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o027)
    try:
        save_result(str(tmp_path), {"text": "hi"}, np.zeros(2400, np.float32))
    finally:
        os.umask(previous)
    for name in ("result.json", "output.wav"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.wav", "result.json"]  # no temporary file left


def test_a_resumed_results_file_drops_a_line_cut_short_and_keeps_the_order(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "text": "1"}\n{"id": "b", "text": "2"}\n{"id": "c", "te')  # killed mid-line
    results = ResultsFile(str(tmp_path), resume=True)
    assert list(results.finished) == ["a", "b"]
    results.append([{"id": "c", "text": "3"}])
    results.append([{"id": "d", "text": "4"}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c", "d"]


def test_a_fresh_run_keeps_an_earlier_file_until_its_first_batch_is_done(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "old", "text": "kept"}\n')
    results = ResultsFile(str(tmp_path), resume=False)
    assert results.finished == {} and "old" in path.read_text()
    results.append([{"id": "new", "text": "x"}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["new"]


def test_a_resumed_results_file_keeps_every_whole_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "a", "text": "1"}\n{"id": "b", "text": "2"}\n')  # a run that finished its batches
    results = ResultsFile(str(tmp_path), resume=True)
    assert list(results.finished) == ["a", "b"]
    results.append([{"id": "c", "text": "3"}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
