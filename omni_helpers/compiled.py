"""What every compiled graph (`decode_graph`, `prompt_graph`, `encoder_graph`) shares: graphs kept on
the model per shape, and the way back to PyNative when a graph does not build.

A graph is compiled at its first call, once per shape, and kept on the model it belongs to (a
plain attribute, not a sub-cell), the latest `GRAPHS_KEPT` of each kind. The graphs have been
compiled on CPU only: if one fails at its first call, the model records why, keeps to PyNative
for that kind of graph from then on, and says so once on stderr. A failure after the first call
is a real one and is raised.
"""

from __future__ import annotations

import sys

import mindspore as ms
from mindspore import ops

GRAPHS_KEPT = 2  # compiled graphs (and their buffers) kept per model and kind, most recent last
BUCKET_MIN = 64  # the fewest positions a graph is compiled for: below it a graph per count would cost more than padding
# The prompt and encoder graphs write attention out, a score for every pair of positions; beyond this many
# positions the PyNative path is kept, whose flash attention's memory grows with the length, not its square.
BUCKET_MAX = 2048


class Graph:
    """A step function compiled with `mindspore.jit` at its first call, and whether that call went through."""

    def __init__(self, step):
        self.step, self.compiled = ms.jit(step), False


def bucket_for(count: int, least: int = BUCKET_MIN) -> int:
    """`count` positions padded up to a power of two (at least `least`), so nearby counts share a graph."""
    return max(least, 1 << (count - 1).bit_length())


def padded(tensor, bucket: int, axis: int = 0):
    """`tensor` padded with zeros along `axis`, after its last entry, to `bucket` entries."""
    length = tensor.shape[axis]
    if length == bucket:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = bucket - length
    return ops.concat([tensor, ops.zeros(tuple(shape), tensor.dtype)], axis)


def kept(owner, kind: str, key: tuple, build):
    """The `kind` graph of `owner` for shape `key`: the one kept, or `build()`; most recent last."""
    graphs = owner.__dict__.setdefault(f"_{kind}s", {})
    graph = graphs.pop(key, None) or build()
    graphs[key] = graph
    while len(graphs) > GRAPHS_KEPT:
        graphs.pop(next(iter(graphs)))
    return graph


def failed(owner, kind: str) -> bool:
    """Whether a `kind` graph of `owner` could not be built on this device (PyNative from then on)."""
    return f"_{kind}_error" in owner.__dict__


def first_call(graph, owner, kind: str, call, what: str, instead: str):
    """`call()`, the graph's call; None when it fails at its first call (the compilation): `owner` then
    keeps to PyNative for `kind` and the reason is said once, as "the compiled {what} did not build"."""
    try:
        outputs = call()
    except (RuntimeError, TypeError, ValueError) as error:
        if graph.compiled:  # a failure after the compilation is a real one
            raise
        message = str(error).strip()
        reason = f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"
        owner.__dict__[f"_{kind}_error"] = reason
        owner.__dict__.pop(f"_{kind}s", None)
        print(f"warning: the compiled {what} did not build ({reason}); {instead}", file=sys.stderr)
        return None
    graph.compiled = True
    return outputs
