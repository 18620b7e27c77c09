"""Device, msrun ranks and seeds, in one call: `setup_runtime`."""

from __future__ import annotations

import gc
import logging
import os
import random
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np

from omni_helpers.request.parallel_modes import resolve_parallel


@dataclass(frozen=True)
class Runtime:
    device_target: str
    rank: int = 0
    world_size: int = 1
    parallel: str = "none"  # how the model is spread over the ranks: zero3, expert or none

    @property
    def is_main_process(self) -> bool:
        """Rank 0 prints and writes; the other ranks only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_msrun() -> bool:
    """msrun runs the script in its scheduler (MS_ROLE=MS_SCHED) and in every worker
    (MS_ROLE=MS_WORKER); all of them must join the cluster. Plain python sets no role."""
    return os.environ.get("MS_ROLE") in ("MS_SCHED", "MS_WORKER")


def stdout_for_the_launcher() -> None:
    """Under the launchers (`scripts/msrun_launch.sh`), rank 0's stdout goes to the file they show on
    their own stdout (`OMNI_RANK0_STDOUT`), so that the console carries the answer alone; rank 0's stderr
    and every other rank's output stay in LOG_DIR/worker_<rank>.log. Call first thing in `main`."""
    path = os.environ.get("OMNI_RANK0_STDOUT")
    if not path or not launched_by_msrun() or os.environ.get("RANK_ID") != "0":
        return
    sys.stdout.flush()
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(target, sys.stdout.fileno())
    os.close(target)


def progress(message: str) -> None:
    """A start-up stage on stderr, with the seconds since the process started (a load takes minutes on Ascend)."""
    from omni_helpers.measuring.metrics import process_start

    print(f"[{time.time() - process_start():6.1f} s] {message}", file=sys.stderr, flush=True)


def configure_openmp(device_target: str) -> None:
    """Before MindSpore is imported (its OpenMP runtime reads the setting once, when it loads): on
    CPU, one OpenMP thread for MindSpore's kernels, unless the user set OMP_NUM_THREADS. A CPU-only
    speed-up: on 2 cores an idle OpenMP worker spinning for the next parallel region competes with
    the compiled decode step for a core, and each tiny decode-step matmul split over two threads
    costs more in hand-offs than it saves (the tiny checkpoint decoded from 50 to 330 tokens/s from
    one request to the next, and a steady 200 with one thread). On Ascend nothing changes."""
    if device_target == "CPU":
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@contextmanager
def caller_on_its_own_core():
    """CPU only, one process, Linux: while the block runs, the calling thread (the one running the
    model) alone on the first core the process may use, every other thread of the process on the
    others; afterwards each thread back where it was. A CPU-only speed-up around each request
    (`core.generate_from_inputs`).

    Why: MindSpore's helper threads (a CPU-kernel worker, the graph actor, the PyNative dispatch
    queue) spin while they wait for work. On 2 cores they now and then preempted the thread running
    the model for 50 to 200 ms: about one tiny-checkpoint request in five stalled (a first token at
    0.2 s instead of 0.015, decode steps at 45 ms instead of 4). Placed apart, 20 requests in a row
    ran without one. Put back afterwards, so that nothing else (a subprocess the caller starts, a
    PyTorch reference run in the same process) inherits the placement; threads started during the
    block (inheriting the caller's core) get every core. Under msrun the workers share the cores,
    and on Ascend the model runs on the NPU: nothing is moved."""
    import mindspore as ms

    placed = {}
    if hasattr(os, "sched_setaffinity") and not launched_by_msrun() and ms.get_context("device_target") == "CPU":
        placed = {thread: allowed for thread in process_threads() if (allowed := thread_cores(thread)) is not None}
    cores = set().union(*placed.values())
    if len(cores) >= 2:
        caller, own = threading.get_native_id(), {min(cores)}
        for thread in placed:
            move_thread(thread, own if thread == caller else cores - own)
    try:
        yield
    finally:
        if len(cores) >= 2:  # threads started meanwhile inherited the caller's core: they get every core
            for thread in process_threads():
                move_thread(thread, placed.get(thread, cores))


def process_threads() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/task")]


def thread_cores(thread: int) -> Optional[set]:
    """The cores a thread of this process may run on; None if it ended since it was listed."""
    try:
        return os.sched_getaffinity(thread)
    except ProcessLookupError:
        return None


def move_thread(thread: int, cores: set) -> None:
    try:
        os.sched_setaffinity(thread, cores)
    except (ProcessLookupError, PermissionError):  # it ended meanwhile, or it is not ours to move
        pass


def out_of_garbage_collection() -> None:
    """Collect once, then leave what survives out of later collections (`gc.freeze`); called once a model
    is loaded (`loading.shard_model`). Its Python objects (about 730,000 for the tiny checkpoint) are never
    garbage, yet every full collection walked them all: 370 ms on this machine, landing in whichever
    decode step triggered it (a host pause on every device). Later collections see what requests allocate."""
    gc.collect()
    gc.freeze()


def seed_everything(seed: int) -> None:
    """Same seed on every rank: with sampling on, ranks must take identical decoding steps."""
    import mindspore as ms

    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


def setup_runtime(
    device_target: str = "Ascend",
    seed: int = 0,
    parallel: Optional[str] = None,
    verbose: bool = False,
    scratch: Optional[tempfile.TemporaryDirectory] = None,
) -> Runtime:
    """Select the device, join the msrun job if there is one, seed every random stream.

    `parallel` is the --parallel flag (None: zero3 with several msrun workers, none otherwise);
    `verbose` (--verbose) logs a line per decoding step with its time on stderr; `scratch`, the
    script's temporary folder, is removed first in msrun's scheduler (below).
    """
    import mindspore as ms

    show_step_times(verbose)

    if ms.get_context("device_target") != device_target:  # MindSpore refuses a second set-up once kernels ran
        ms.set_device(device_target)
    rank, world_size = 0, 1
    if launched_by_msrun():
        from mindspore.communication import get_group_size, get_rank, init

        if scratch is not None and os.environ.get("MS_ROLE") == "MS_SCHED":
            # msrun's scheduler runs the script up to here; its init() coordinates the workers and then ends
            # the process without Python's clean-up at exit, which would leave the folder behind
            scratch.cleanup()
        # HCCL on Ascend; on CPU init() picks MindSpore's own mccl backend.
        init("hccl" if device_target == "Ascend" else None)
        rank, world_size = get_rank(), get_group_size()
    mode = resolve_parallel(parallel, world_size)
    if mode == "zero3":
        ms.set_auto_parallel_context(parallel_mode="data_parallel")  # without it prepare_network changes nothing
    seed_everything(seed)
    runtime = Runtime(device_target=device_target, rank=rank, world_size=world_size, parallel=mode)
    if parallel not in (None, mode):
        log(runtime, f"--parallel {parallel} needs msrun with more than one worker; this process holds the whole model")
    return runtime


def show_step_times(verbose: bool) -> None:
    """The project's own log lines (decode steps' times) on stderr with --verbose; off otherwise."""
    logger = logging.getLogger("omni_helpers")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def log(runtime: Runtime, message: str) -> None:
    """A line on stderr tagged with the rank: under msrun it lands in that worker's log."""
    print(f"[rank {runtime.rank}/{runtime.world_size}] {message}", file=sys.stderr, flush=True)
