"""Process set-up (omni_helpers/runtime.py)."""

from __future__ import annotations

import os
import threading

from omni_helpers.runtime import caller_on_its_own_core, configure_openmp


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


def thread_waiting(stop: threading.Event) -> threading.Thread:
    """Another thread of the process, as MindSpore's helpers are, idle until `stop` is set."""
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    return thread


def test_on_cpu_the_caller_has_a_core_of_its_own_while_it_runs_and_every_thread_is_put_back(runtime_cpu):
    stop = threading.Event()
    helper = thread_waiting(stop)
    cores = os.sched_getaffinity(0)
    try:
        with caller_on_its_own_core():
            mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(helper.native_id)
            started = thread_waiting(stop)  # inherits the caller's core while the block runs
        assert os.sched_getaffinity(started.native_id) == cores
        if len(cores) >= 2:
            assert mine == {min(cores)} and theirs == cores - mine
        else:  # one core: nothing to place
            assert mine == theirs == cores
        assert os.sched_getaffinity(0) == os.sched_getaffinity(helper.native_id) == cores
    finally:
        stop.set()


def test_a_thread_that_ends_while_the_threads_are_placed_is_left_alone(runtime_cpu, monkeypatch):
    from omni_helpers import runtime

    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()  # listed, then gone before its cores are read: a race the server's threads can run
    listed = runtime.process_threads()
    monkeypatch.setattr(runtime, "process_threads", lambda: listed + [ended.native_id])
    cores = os.sched_getaffinity(0)
    with caller_on_its_own_core():
        assert os.sched_getaffinity(0) == ({min(cores)} if len(cores) >= 2 else cores)
    assert os.sched_getaffinity(0) == cores


def test_under_msrun_no_thread_is_moved(runtime_cpu, monkeypatch):
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")  # the workers share the machine's cores
    stop = threading.Event()
    helper = thread_waiting(stop)
    cores = os.sched_getaffinity(0)
    try:
        with caller_on_its_own_core():
            assert os.sched_getaffinity(0) == os.sched_getaffinity(helper.native_id) == cores
    finally:
        stop.set()


def test_a_request_runs_the_model_on_a_core_of_its_own(mindone, two_rows):
    """The core's request: the forwards run with the caller alone on its core, and nothing stays placed."""
    from omni_helpers.generation.core import generate_from_inputs
    from omni_helpers.request.settings import GenerationSettings

    cores, seen = os.sched_getaffinity(0), []
    handle = mindone.model.thinker.register_forward_hook(lambda *_: seen.append(os.sched_getaffinity(0)))
    try:
        generate_from_inputs(mindone.model, mindone.processor, two_rows, GenerationSettings(max_new_tokens=2))
    finally:
        handle.remove()
    assert len(seen) == 2 and all(placed == ({min(cores)} if len(cores) >= 2 else cores) for placed in seen)
    assert os.sched_getaffinity(0) == cores
