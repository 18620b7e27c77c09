"""Process set-up (omni_helpers/runtime.py)."""

from __future__ import annotations

import os

from omni_helpers.runtime import configure_openmp


def test_openmp_gets_one_thread_on_cpu_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    configure_openmp("Ascend")
    assert "OMP_NUM_THREADS" not in os.environ
    configure_openmp("CPU")
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    configure_openmp("CPU")
    assert os.environ["OMP_NUM_THREADS"] == "2"
