"""Bytes moved by MindSpore's collectives while a generation runs: what sets the two msrun
modes apart (`--parallel zero3` all-gathers weights, `expert` all-reduces hidden states).

`counting_collectives()` wraps the `AllGather` and `AllReduce` primitives' `__call__` for
the length of a `with` block only, and yields a counter of this rank's bytes sent plus
received, as the ring algorithms move them. The collectives inside a compiled graph run
without a call from Python: each call of a graph adds the bytes its builder worked out
from its weights (`compiled.Graph.collective_bytes`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

from omni_helpers.patching import PatchSet

COMMUNICATION_OPS = "mindspore.ops.operations.comm_ops"


@dataclass
class Traffic:
    bytes: float = 0.0


def collective_bytes(kind: str, input_bytes: float, world_size: int) -> float:
    """Bytes one rank sends plus receives in one collective over `world_size` ranks, as the
    ring algorithms move them. all_gather of an input (shard) of b bytes: (N-1)*b out and
    (N-1)*b in. all_reduce of b bytes: 2(N-1)/N*b out and as many in."""
    if kind == "all_gather":
        return 2 * (world_size - 1) * input_bytes
    if kind == "all_reduce":
        return 2 * 2 * (world_size - 1) / world_size * input_bytes
    raise ValueError(f"unknown collective {kind!r}")


COUNTERS = PatchSet("collective counters", package="mindspore", written_for="2.7.1")  # built once: one version warning
_open: list[Traffic] = []  # the counters of the `with` blocks open now; nested blocks each count everything


def _counted(kind: str, target: str):
    def call(primitive, *args, **kwargs):
        from mindspore.communication import get_group_size

        moved = collective_bytes(kind, args[0].nbytes, get_group_size(primitive.group))
        for traffic in _open:
            traffic.bytes += moved
        return COUNTERS.original(target)(primitive, *args, **kwargs)

    return call


for _kind, _primitive in (("all_gather", "AllGather"), ("all_reduce", "AllReduce")):
    _target = f"{COMMUNICATION_OPS}.{_primitive}:__call__"
    COUNTERS.replaces(_target)(_counted(_kind, _target))


def _counted_step(step):
    def counted_step(graph, *arguments):
        for traffic in _open:
            traffic.bytes += graph.collective_bytes
        return step(graph, *arguments)

    counted_step.original = step
    return counted_step


@contextlib.contextmanager
def counting_collectives():
    """Count this rank's collective bytes inside the block; the primitives are restored after the outermost one."""
    traffic = Traffic()
    if not _open:
        COUNTERS.install()
        graph = _compiled_graph()
        if graph is not None:
            graph.step = _counted_step(graph.step)
    _open.append(traffic)
    try:
        yield traffic
    finally:
        _open.remove(traffic)
        if not _open:
            COUNTERS.uninstall()
            graph = _compiled_graph()
            if graph is not None and hasattr(graph.step, "original"):
                graph.step = graph.step.original


def _compiled_graph():
    """compiled.Graph if the faster paths are imported (with --no-fast_paths no graph runs: nothing to count)."""
    compiled = sys.modules.get("omni_helpers.mindone_changes.faster.compiled")
    return None if compiled is None else compiled.Graph
