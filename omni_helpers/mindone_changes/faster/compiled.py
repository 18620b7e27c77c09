"""What every compiled graph (`decode_graph`, `prompt_graph`, `encoder_graph`) shares: graphs kept on
the model per shape, and the way back to PyNative when a graph does not build.

A graph is compiled at its first call, once per shape, and kept on the model it belongs to (a
plain attribute, not a sub-cell), the latest `GRAPHS_KEPT` of each kind. The graphs have been
compiled on CPU only: if one fails at its first call, the model records why, keeps to PyNative
for that kind of graph from then on, and says so once on stderr. A failure after the first call
is a real one and is raised.

A graph that holds collectives (the decode steps under `--parallel zero3` and `expert`) is
compiled apart from its first run, and the ranks agree on the outcome before any of them runs
it: if it failed to build on one rank, every rank keeps to PyNative, since a rank running the
graph while another runs PyNative would pair their collectives wrongly and hang.
"""

from __future__ import annotations

import sys
import time

import mindspore as ms
from mindspore import ops
from mindspore.common.api import _JitExecutor  # what `mindspore.jit` runs at each call: compiles (once), then runs

GRAPHS_KEPT = 2  # compiled graphs (and their buffers) kept per model and kind, most recent last
BUCKET_MIN = 64  # the fewest positions a graph is compiled for: below it a graph per count would cost more than padding
# The prompt and encoder graphs write attention out, a score for every pair of positions; beyond this many
# positions the PyNative path is kept, whose flash attention's memory grows with the length, not its square.
BUCKET_MAX = 2048


class Graph:
    """A step function compiled as `mindspore.jit` compiles it, at its first call or before it (`compile`),
    and whether it went through."""

    collective_bytes = 0.0  # this rank's bytes sent plus received by the collectives of one call (`collectives`)

    def __init__(self, step):
        self.function, self.compiled = step, False
        self.key = time.time_ns()  # mindspore.jit's key for this function's compiled graphs (one per input shape)

    def step(self, *arguments):
        """The compiled step: compiled at the first call for these shapes, run."""
        return _JitExecutor(self.function, self.key)(*arguments)

    def compile(self, *arguments) -> None:
        """Compile the step for these arguments' shapes without running it (its next `step` runs the graph)."""
        _JitExecutor(self.function, self.key).compile(self.function.__name__, *arguments)


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


def keep_graphs(count: int) -> None:
    """How many graphs of each kind each model keeps: a script meets a shape or two, a server as many as its
    batches have sizes and lengths (each decode graph kept holds its KV buffers)."""
    global GRAPHS_KEPT
    GRAPHS_KEPT = count


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


BUILD_ERRORS = (RuntimeError, TypeError, ValueError)  # what a graph that does not build raises


def first_call(graph, owner, kind: str, call, what: str, instead: str, agree_on=None):
    """`call()`, the graph's call; None when it fails at its first call (the compilation): `owner` then
    keeps to PyNative for `kind` and the reason is said once, as "the compiled {what} did not build".
    `agree_on`, for a graph holding collectives under msrun: the step's arguments, to compile it first
    and agree with every rank on whether it built (`failed_anywhere`) before it runs."""
    if not graph.compiled and agree_on is not None:
        try:
            graph.compile(*agree_on)
            reason = None
        except BUILD_ERRORS as error:
            reason = why(error)
        if failed_anywhere(reason is not None):
            give_up(owner, kind, what, instead, reason or "it did not build on another rank")
            return None
        graph.compiled = True  # built on every rank: from here a failure is a real one
    try:
        outputs = call()
    except BUILD_ERRORS as error:
        if graph.compiled:  # a failure after the compilation is a real one
            raise
        give_up(owner, kind, what, instead, why(error))
        return None
    graph.compiled = True
    return outputs


def why(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip(" -")]  # MindSpore frames its messages in dashes
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"


def give_up(owner, kind: str, what: str, instead: str, reason: str) -> None:
    """`owner` keeps to PyNative for `kind` graphs from now on; said once."""
    owner.__dict__[f"_{kind}_error"] = reason
    owner.__dict__.pop(f"_{kind}s", None)
    print(f"warning: the compiled {what} did not build ({reason}); {instead}", file=sys.stderr)


def failed_anywhere(failed_here: bool) -> bool:
    """Whether any rank failed: one all-reduce of a flag, read once (a graph's first build only; through
    `mint.distributed`, which the per-token traffic counters leave out)."""
    from mindspore import mint

    flag = ms.Tensor([1.0 if failed_here else 0.0], ms.float32)
    mint.distributed.all_reduce(flag)
    return bool(flag.asnumpy()[0] > 0)
