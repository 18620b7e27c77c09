"""Listeners on a cell's forwards (omni_helpers/measuring/forward_taps.py)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn

from omni_helpers.measuring.forward_taps import listen


def test_listeners_come_and_go_without_registering_hooks_again(runtime_cpu):
    """Only the first listener registers hooks: every registration bumps the hook version that keys
    MindSpore's compiled graphs, and a bump per request would recompile the decode graphs each time."""
    from mindspore.common.hook_handle import _hook_version

    cell = nn.Dense(3, 2)
    x = ms.Tensor(np.ones((1, 3), np.float32))
    calls = []
    first = listen(cell, before=lambda *_: calls.append("before 1"), after=lambda *_: calls.append("after 1"))
    version = _hook_version()
    second = listen(cell, after=lambda cell, inputs, outputs: calls.append(("after 2", outputs.shape)))
    assert _hook_version() == version
    cell(x)
    assert calls == ["before 1", "after 1", ("after 2", (1, 2))]
    for handle in first:
        handle.remove()
    calls.clear()
    cell(x)
    assert calls == [("after 2", (1, 2))]
    for handle in second:
        handle.remove()
    calls.clear()
    cell(x)
    assert calls == [] and _hook_version() == version
