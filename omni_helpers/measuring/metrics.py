"""What every run reports: how long each stage took, how fast tokens and speech came, what
each rank holds. Metrics are values: built from clocks and streamers that live for one
call, never from anything installed in the model or the process."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from typing import Any, Optional


def rate(count: float, seconds: float) -> Optional[float]:
    return round(count / seconds, 3) if seconds > 0 and count else None


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


def parameter_bytes(model) -> int:
    """Bytes of the parameters this rank holds (after ZeRO-3 or expert sharding, its share)."""
    unique = {id(param): param for param in model.get_parameters()}
    return int(sum(param.nbytes for param in unique.values()))


def process_start() -> float:
    """When this process started, in seconds since the epoch (Linux: from /proc; elsewhere: when this module
    was imported)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return IMPORTED_AT


IMPORTED_AT = time.time()


def startup_metrics(imported_at: float, loaded_at: float, first_token_at: Optional[float]) -> dict[str, Any]:
    """A run's start-up, from the moment the process started: MindSpore, mindone and torch imported
    (and the device and the patches set up), the model loaded, the first token out."""
    start = process_start()
    return {
        "startup_imports_seconds": round(imported_at - start, 3),
        "startup_loaded_seconds": round(loaded_at - start, 3),
        "startup_first_token_seconds": None if first_token_at is None else round(first_token_at - start, 3),
    }


def run_metrics(clock: StageClock, runtime, model) -> dict[str, Any]:
    """What a whole run adds to each answer's metrics: load time, memory, how the model is spread."""
    return {
        "load_seconds": round(clock.seconds.get("load", 0.0), 3),
        "peak_host_memory_mb": peak_host_memory_mb(),
        "peak_device_memory_mb": peak_device_memory_mb(runtime.device_target),
        "parallel": runtime.parallel,
        "world_size": runtime.world_size,
        "parameter_bytes": parameter_bytes(model),
    }


PER_ROW = ("prompt_tokens", "thinker_new_tokens", "decoded_tokens", "talker_codec_frames", "audio_seconds")
PER_BATCH = ("preprocessing_seconds", "generate_seconds", "prefill_seconds", "decode_seconds")


def combined(answers_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Several answers' metrics as one (a captioning run's result.json). Counts are summed over
    answers; times over batches (each of a batch's B rows carries the batch's time, so a row
    adds 1/B of it); the decode rate is then tokens over time, summed over the rows of a batch."""
    total = dict(answers_metrics[0])
    total["requests"] = len(answers_metrics)
    for key in PER_ROW:
        total[key] = round(sum(m[key] or 0 for m in answers_metrics), 3)
    for key in PER_BATCH:
        total[key] = round(sum((m[key] or 0) / m["batch_size"] for m in answers_metrics), 3)
    total["thinker_decode_tokens_per_second"] = rate(total["decoded_tokens"], total["decode_seconds"])
    return total


def summary_line(metrics: dict[str, Any]) -> str:
    """One human line for rank 0's stderr."""
    parts = [
        f"load {metrics['load_seconds']}s",
        f"prompt {metrics['prompt_tokens']} tokens, first token after {metrics['time_to_first_token_seconds']}s",
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
