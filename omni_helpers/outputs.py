"""Writing results: rank 0 only, each file whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

SPEECH_SAMPLE_RATE = 24000  # code2wav's output rate
RESULT_FILE = "result.json"
SPEECH_FILE = "output.wav"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp):
        Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    _atomic_write(path, write)


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> None:
    import soundfile as sf

    _atomic_write(path, lambda tmp: sf.write(tmp, waveform, sample_rate, format="WAV", subtype="PCM_16"))


def save_outputs(output_dir: str, result: dict[str, Any], waveform: Optional[np.ndarray]) -> dict[str, Any]:
    """Write output.wav (if any) and then result.json, which names it; returns the result."""
    out = Path(output_dir)
    result = dict(result, audio=None)
    if waveform is not None:
        wav_path = out / SPEECH_FILE
        write_wav(wav_path, waveform)
        result["audio"] = str(wav_path)
    write_json(out / RESULT_FILE, result)
    return result


def speech_digest(waveform: Optional[np.ndarray]) -> str:
    """Length and a hash of the 16-bit samples: what each rank logs so that ranks can be compared."""
    import hashlib

    if waveform is None:
        return "none"
    pcm = np.clip(np.round(waveform * 32767), -32768, 32767).astype("<i2")
    return f"{len(pcm)} samples sha1 {hashlib.sha1(pcm.tobytes()).hexdigest()[:16]}"


def publish(runtime, output_dir: str, result: dict[str, Any], waveform: Optional[np.ndarray]) -> dict[str, Any]:
    """Every rank logs what it generated (so ranks can be compared); rank 0 prints the answer(s),
    a metrics summary, and saves. Returns the result as saved."""
    from .metrics import summary_line
    from .runtime import log

    log(runtime, f"text: {result['text']!r}; speech: {speech_digest(waveform)}")
    if not runtime.is_main_process:
        return result
    for answer in result["text"] if isinstance(result["text"], list) else [result["text"]]:
        print(answer, flush=True)
    log(runtime, summary_line(result["metrics"]))
    return save_outputs(output_dir, result, waveform)
