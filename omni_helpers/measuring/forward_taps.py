"""Listening to a cell's forwards without registering a hook per request.

MindSpore keys every compiled graph (`mindspore.jit`) with a process-wide hook version that
each `register_forward_hook` and each removal bumps: a request that registered and removed
its own hooks would throw away the compiled decode step (`decode_graph`) and pay its
compilation again on the next request. So each cell gets one pair of hooks, registered the
first time anything listens to it and kept; listeners come and go in a plain list.
Works the same on a torch module (the benchmark times the PyTorch reference this way).
"""

from __future__ import annotations

from typing import Callable, Optional


class ForwardTaps:
    """The listeners of one cell's forwards: `before(cell, inputs)` and `after(cell, inputs, outputs)`."""

    def __init__(self, cell):
        self.before: list[Callable] = []
        self.after: list[Callable] = []
        cell.register_forward_pre_hook(self._before)
        cell.register_forward_hook(self._after)

    def _before(self, cell, inputs):
        for listener in list(self.before):
            listener(cell, inputs)

    def _after(self, cell, inputs, outputs):
        for listener in list(self.after):
            listener(cell, inputs, outputs)


class Listening:
    """What `listen` returns: `remove()` stops the listener (the same call as a hook handle's)."""

    def __init__(self, listeners: list, listener: Callable):
        self.listeners, self.listener = listeners, listener

    def remove(self) -> None:
        if self.listener in self.listeners:
            self.listeners.remove(self.listener)


def listen(cell, before: Optional[Callable] = None, after: Optional[Callable] = None) -> list[Listening]:
    """Call `before` at the start and `after` at the end of each of `cell`'s forwards until removed."""
    taps = cell.__dict__.get("_forward_taps")
    if taps is None:
        taps = ForwardTaps(cell)
        cell.__dict__["_forward_taps"] = taps  # a plain attribute: a Cell's setattr would register it
    handles = []
    for listeners, listener in ((taps.before, before), (taps.after, after)):
        if listener is not None:
            listeners.append(listener)
            handles.append(Listening(listeners, listener))
    return handles
