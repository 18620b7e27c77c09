"""Counting host synchronisations: every read of a tensor's value on the host.

On an NPU each one stalls the launch pipeline that keeps the device busy while Python
prepares the next operations: the host waits for everything queued before it. What carries
from a CPU run to an NPU is how many there are per decoded token, and where they come from.

`counting_host_syncs()` wraps MindSpore's Tensor methods that hand a value to Python
(`asnumpy`, `item`, `tolist`, and the conversions behind `if tensor:`, `int(tensor)`,
`float(tensor)`, `range(tensor)`) for the length of a `with` block, counting each outermost
call (one read may call another inside) and the line of code that made it.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from dataclasses import dataclass, field

from omni_helpers.patching import PatchSet

TENSOR = "mindspore.common.tensor.Tensor"
READS = ("asnumpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@dataclass
class HostSyncs:
    count: int = 0
    sites: collections.Counter = field(default_factory=collections.Counter)  # "file:line" of the caller


def _caller() -> str:
    frame = sys._getframe(2)
    while frame and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_lineno}" if frame else "?"


COUNTERS = PatchSet("host-sync counters", package="mindspore", written_for="2.7.1")  # built once: one version warning
_open: list[HostSyncs] = []  # the counters of the `with` blocks open now; nested blocks each count everything
_depth = 0  # reads in progress: one read may call another inside, and only the outermost counts


def _counted(name: str):
    target = f"{TENSOR}:{name}"

    def read(tensor, *args, **kwargs):
        global _depth
        if _depth == 0:
            site = _caller()
            for syncs in _open:
                syncs.count += 1
                syncs.sites[site] += 1
        _depth += 1
        try:
            return COUNTERS.original(target)(tensor, *args, **kwargs)
        finally:
            _depth -= 1

    return read


for _name in READS:
    COUNTERS.replaces(f"{TENSOR}:{_name}")(_counted(_name))


@contextlib.contextmanager
def counting_host_syncs():
    """Count host reads of tensor values inside the block; the methods are restored after the outermost one."""
    syncs = HostSyncs()
    if not _open:
        COUNTERS.install()
    _open.append(syncs)
    try:
        yield syncs
    finally:
        _open.remove(syncs)
        if not _open:
            COUNTERS.uninstall()
