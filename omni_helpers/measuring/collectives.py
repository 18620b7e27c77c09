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


@contextlib.contextmanager
def counting_collectives():
    """Count this rank's collective bytes inside the block; the primitives are restored after it."""
    from mindspore.communication import get_group_size

    traffic = Traffic()
    counters = PatchSet("collective counters", package="mindspore", written_for="2.7.1")

    def counted(kind: str, target: str):
        def call(primitive, *args, **kwargs):
            traffic.bytes += collective_bytes(kind, args[0].nbytes, get_group_size(primitive.group))
            return counters.original(target)(primitive, *args, **kwargs)

        return call

    for kind, primitive in (("all_gather", "AllGather"), ("all_reduce", "AllReduce")):
        target = f"{COMMUNICATION_OPS}.{primitive}:__call__"
        counters.replaces(target)(counted(kind, target))

    compiled = sys.modules.get(
        "omni_helpers.mindone_changes.faster.compiled"
    )  # not imported: no compiled graph (--no-fast_paths)
    if compiled is None:
        with counters.applied():
            yield traffic
        return
    step = compiled.Graph.step

    def counted_step(graph, *arguments):
        traffic.bytes += graph.collective_bytes
        return step(graph, *arguments)

    compiled.Graph.step = counted_step
    try:
        with counters.applied():
            yield traffic
    finally:
        compiled.Graph.step = step
