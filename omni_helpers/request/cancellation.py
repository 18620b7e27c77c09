"""Stopping a generation that nobody waits for any more.

The server gives each request a `Cancellation`; the HTTP handler or the UI sets it when the
client disconnects or presses Stop. It rides into mindone's `generate` as a stopping
criterion of the thinker and of the talker (the one way `generate` takes a per-call object),
and the generation loop (`decode_loop`) takes it out of the criteria list and reads it once
per decoding step, on the host: nothing is added to the device's work. Under msrun every
rank passes one (only rank 0's can be set) and the loop adds its state to the all-reduce it
already makes to agree on stopping, so every rank stops at the same step and raises
`errors.Cancelled`.
"""

from __future__ import annotations

import threading


class Cancellation:
    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def __call__(self, input_ids, scores, **kwargs):
        """The stopping-criteria protocol, for mindone's own loop (which runs where the project's does not):
        every row is done once cancelled. The project's loop never calls it."""
        import mindspore as ms
        from mindspore import mint

        return mint.full((input_ids.shape[0],), self.cancelled, dtype=ms.bool_)
