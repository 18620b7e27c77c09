"""Device, distributed and seed set-up shared by every script: one call, `setup_runtime`."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .parallel import resolve_parallel


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


def seed_everything(seed: int) -> None:
    """Same seed on every rank: with sampling on, ranks must take identical decoding steps."""
    import mindspore as ms

    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


def setup_runtime(
    device_target: str = "Ascend", seed: int = 0, fast_paths: bool = True, parallel: Optional[str] = None
) -> Runtime:
    """Select the device, join the msrun job if there is one, install what the device needs.

    `parallel` is the --parallel flag (None: zero3 with several msrun workers, none otherwise).

    On CPU the CPU fallbacks for Ascend-only kernels are installed; on every device the
    fixes for mindone's own bugs are installed, and the faster paths unless `fast_paths`
    is False (the benchmark's stock variant).
    """
    import mindspore as ms

    ms.set_device(device_target)
    if device_target == "CPU":
        from .cpu_fallbacks import install_cpu_fallbacks

        install_cpu_fallbacks()
    from .mindone_fixes import install_mindone_fixes

    install_mindone_fixes()
    if fast_paths:
        from .fast_paths import install_fast_paths

        install_fast_paths(device_target)

    rank, world_size = 0, 1
    if launched_by_msrun():
        from mindspore.communication import get_group_size, get_rank, init

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


def log(runtime: Runtime, message: str) -> None:
    """A line on stderr tagged with the rank: under msrun it lands in that worker's log."""
    import sys

    print(f"[rank {runtime.rank}/{runtime.world_size}] {message}", file=sys.stderr, flush=True)
