"""Keeping a resident server's msrun ranks in step: rank 0 sends each job to the others.

Rank 0 validates and preprocesses every request; what the model needs (the processor's
arrays, the settings, whether speech is streamed) goes to the other ranks through
MindSpore's own collectives, so media never have to exist on another rank's disk. A job
travels as its length, then its bytes as a uint8 tensor, both broadcast from rank 0 (one
mechanism for mccl on CPU and HCCL on Ascend; MindSpore's `broadcast_object_list` fails
on CPU). The bytes are JSON plus numpy's npz: nothing is unpickled.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

STOP = {"kind": "stop"}
IDLE = {"kind": "idle"}  # nothing to do yet: sent now and then, so that no rank waits in a collective for long


def pack(job: dict[str, Any]) -> bytes:
    """{"kind", ..., "inputs": {name: array}} as bytes: a JSON header, then the arrays as npz."""
    header = json.dumps({key: value for key, value in job.items() if key != "inputs"}).encode()
    arrays = io.BytesIO()
    np.savez(arrays, **job.get("inputs", {}))
    return len(header).to_bytes(8, "little") + header + arrays.getvalue()


def unpack(data: bytes) -> dict[str, Any]:
    length = int.from_bytes(data[:8], "little")
    job = json.loads(data[8 : 8 + length])
    with np.load(io.BytesIO(data[8 + length :]), allow_pickle=False) as arrays:
        job["inputs"] = {name: arrays[name] for name in arrays.files}
    return job


class Lockstep:
    """Broadcasts jobs from rank 0; every other rank receives them in the same order."""

    def __init__(self, runtime):
        self.runtime = runtime

    def _broadcast(self, tensor):
        from mindspore import mint

        mint.distributed.broadcast(tensor, src=0)
        return tensor

    def send(self, job: dict[str, Any]) -> None:
        """Rank 0: hand `job` to every other rank (nothing to do in one process)."""
        if not self.runtime.distributed:
            return
        import mindspore as ms

        data = np.frombuffer(pack(job), dtype=np.uint8)
        self._broadcast(ms.Tensor(np.array([len(data)], np.int64)))
        self._broadcast(ms.Tensor(data))

    def receive(self) -> dict[str, Any]:
        """Any other rank: wait for rank 0's next job."""
        import mindspore as ms

        length = int(self._broadcast(ms.Tensor(np.zeros(1, np.int64))).asnumpy()[0])
        data = self._broadcast(ms.Tensor(np.zeros(length, np.uint8))).asnumpy()
        return unpack(data.tobytes())
