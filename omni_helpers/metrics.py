"""How long each stage took and how fast each generated token came: what every script reports.

`StageClock` times named phases (load, preprocessing); `count_forwards` wraps the
thinker's and the talker's forward so that the first call of a `generate` (the prefill)
and the following ones (one per decoded token or codec frame) are timed apart, without
touching mindone's code. It also notes the bytes MindSpore's collectives moved during
each forward (`COLLECTIVE_COUNTERS`), which is what sets the two msrun modes apart.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .patching import PatchSet

if TYPE_CHECKING:
    from .runtime import Runtime


# ----------------------------------------------------------------------------- collectives

COMMUNICATION_OPS = "mindspore.ops.operations.comm_ops"
COLLECTIVE_COUNTERS = PatchSet("collective counters")


@dataclass
class Traffic:
    """Bytes this rank has sent plus received in MindSpore's collectives since the counters were installed."""

    bytes: float = 0.0


TRAFFIC = Traffic()


def collective_bytes(kind: str, input_bytes: float, world_size: int) -> float:
    """Bytes one rank sends plus receives in one collective over `world_size` ranks, as the
    ring algorithms move them. all_gather of an input (shard) of b bytes: (N-1)*b out and
    (N-1)*b in. all_reduce of b bytes: 2(N-1)/N*b out and as many in."""
    if kind == "all_gather":
        return 2 * (world_size - 1) * input_bytes
    if kind == "all_reduce":
        return 2 * 2 * (world_size - 1) / world_size * input_bytes
    raise ValueError(f"unknown collective {kind!r}")


def _counting(kind: str, target: str):
    def counted_call(primitive, *args, **kwargs):
        from mindspore.communication import get_group_size

        TRAFFIC.bytes += collective_bytes(kind, args[0].nbytes, get_group_size(primitive.group))
        return COLLECTIVE_COUNTERS.original(target)(primitive, *args, **kwargs)

    return counted_call


for _kind, _class in (("all_gather", "AllGather"), ("all_reduce", "AllReduce")):
    _target = f"{COMMUNICATION_OPS}.{_class}:__call__"
    COLLECTIVE_COUNTERS.replaces(_target)(_counting(_kind, _target))


# ----------------------------------------------------------------------------- forwards


@dataclass
class ForwardTimes:
    """Seconds (and collective bytes) of each forward call of one module, grouped by
    `generate`: the first call of each is its prefill."""

    runs: list[list[float]] = field(default_factory=lambda: [[]])
    traffic: list[list[float]] = field(default_factory=lambda: [[]])

    @property
    def calls(self) -> list[float]:
        return [seconds for run in self.runs for seconds in run]

    def record(self, seconds: float, communicated_bytes: float = 0.0) -> None:
        self.runs[-1].append(seconds)
        self.traffic[-1].append(communicated_bytes)

    def next_generate(self) -> None:
        if self.runs[-1]:
            self.runs.append([])
            self.traffic.append([])

    @property
    def prefill_seconds(self) -> float:
        return sum(run[0] for run in self.runs if run)

    @property
    def decode_steps(self) -> int:
        return sum(max(len(run) - 1, 0) for run in self.runs)

    @property
    def decode_seconds(self) -> float:
        return sum(sum(run[1:]) for run in self.runs)

    @property
    def decode_bytes(self) -> float:
        """Bytes the collectives moved during the decode steps (sent plus received by this rank)."""
        return sum(sum(run[1:]) for run in self.traffic)


@contextlib.contextmanager
def count_forwards(module, times: Optional[ForwardTimes] = None):
    """Time every forward of `module` (a mindone Cell) while the context is open, and count
    the bytes of the collectives it ran; pass `times` to keep adding to it over several
    `generate` calls."""
    COLLECTIVE_COUNTERS.install()  # only counts; idempotent
    times = times if times is not None else ForwardTimes()
    times.next_generate()
    if module is None:
        yield times
        return
    construct = module.construct

    @functools.wraps(construct)  # generate() reads the forward's signature
    def timed_construct(*args, **kwargs):
        start, sent_and_received = time.perf_counter(), TRAFFIC.bytes
        out = construct(*args, **kwargs)
        times.record(time.perf_counter() - start, TRAFFIC.bytes - sent_and_received)
        return out

    module.construct = timed_construct
    try:
        yield times
    finally:
        del module.construct  # back to the class's method


class StageClock:
    """Named wall-clock phases: `with clock("load"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def peak_device_memory_mb(device_target: str) -> Optional[float]:
    """Peak device memory MindSpore allocated, where the device reports it (Ascend); None on CPU."""
    if device_target == "CPU":
        return None
    try:
        import mindspore as ms

        return round(ms.runtime.max_memory_allocated() / 2**20, 1)
    except Exception:  # older MindSpore or a device without the counter
        return None


def _rate(count: float, seconds: float) -> Optional[float]:
    return round(count / seconds, 3) if seconds > 0 and count else None


def parameter_bytes(model) -> int:
    """Bytes of the parameters this rank holds (after ZeRO-3 or expert sharding, its share)."""
    unique = {id(param): param for param in model.get_parameters()}
    return int(sum(param.nbytes for param in unique.values()))


def generation_metrics(
    clock: StageClock,
    prompt_tokens: int,
    thinker: ForwardTimes,
    talker: ForwardTimes,
    audio_seconds: float,
    runtime: "Runtime",
    model,
) -> dict[str, Any]:
    """The `metrics` object of result.json (rank 0's figures)."""
    talker_seconds = talker.prefill_seconds + talker.decode_seconds
    return {
        "load_seconds": round(clock.seconds.get("load", 0.0), 3),
        "preprocessing_seconds": round(clock.seconds.get("preprocessing", 0.0), 3),
        "generate_seconds": round(clock.seconds.get("generate", 0.0), 3),
        "prompt_tokens": prompt_tokens,
        "prefill_seconds": round(thinker.prefill_seconds, 3),
        "thinker_new_tokens": len(thinker.calls),
        "thinker_decode_tokens_per_second": _rate(thinker.decode_steps, thinker.decode_seconds),
        "talker_codec_frames": len(talker.calls),
        "talker_frames_per_second": _rate(len(talker.calls), talker_seconds),
        "audio_seconds": round(audio_seconds, 3),
        "real_time_factor": round(clock.seconds.get("generate", 0.0) / audio_seconds, 3) if audio_seconds else None,
        "peak_host_memory_mb": peak_host_memory_mb(),
        "peak_device_memory_mb": peak_device_memory_mb(runtime.device_target),
        "parallel": runtime.parallel,
        "world_size": runtime.world_size,
        "parameter_bytes": parameter_bytes(model),
        "communicated_bytes_per_decoded_token": (
            round(thinker.decode_bytes / thinker.decode_steps) if thinker.decode_steps else None
        ),
    }


def summary_line(metrics: dict[str, Any]) -> str:
    """One human line for rank 0's stderr."""
    parts = [
        f"load {metrics['load_seconds']}s",
        f"prompt {metrics['prompt_tokens']} tokens, prefill {metrics['prefill_seconds']}s",
        f"thinker {metrics['thinker_new_tokens']} tokens at {metrics['thinker_decode_tokens_per_second']} tokens/s",
    ]
    if metrics["talker_codec_frames"]:
        parts.append(
            f"talker {metrics['talker_codec_frames']} frames at {metrics['talker_frames_per_second']} frames/s, "
            f"{metrics['audio_seconds']}s of speech (RTF {metrics['real_time_factor']})"
        )
    if metrics["world_size"] > 1:
        parts.append(
            f"--parallel {metrics['parallel']} over {metrics['world_size']} ranks: "
            f"{metrics['parameter_bytes'] / 2**20:.1f} MiB of parameters here, "
            f"{metrics['communicated_bytes_per_decoded_token']} bytes communicated per decoded token"
        )
    parts.append(f"peak host memory {metrics['peak_host_memory_mb']} MB")
    return "metrics: " + "; ".join(parts)
