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


def test_a_loaded_model_is_left_out_of_later_garbage_collections(mindone):
    """Every full collection walked the loaded model's objects (370 ms a time on this machine)."""
    import gc

    from omni_helpers.runtime import out_of_garbage_collection

    cell = mindone.model.thinker.model.layers[0]  # loaded by `shard_model`, which froze it
    assert gc.get_freeze_count() > 100_000 and gc.is_tracked(cell)
    tracked = len(gc.get_objects())  # frozen objects are not among the collector's generations
    assert not any(obj is cell for obj in gc.get_objects(generation=2))
    out_of_garbage_collection()
    assert len(gc.get_objects()) <= tracked
