"""Writing results: rank 0 only, each file whole or not at all.

- One request: OUTPUT_DIR/result.json (and output.wav).
- Many (`--requests`, several `--audio`): OUTPUT_DIR/results.jsonl, one line per request
  in input order, appended as each batch finishes, so an interrupted run keeps what it
  finished and `--resume` skips it; speech goes to OUTPUT_DIR/speech/<position>.wav.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from omni_helpers.generation.speech_stream import SPEECH_SAMPLE_RATE

RESULT_FILE = "result.json"
RESULTS_FILE = "results.jsonl"
SPEECH_FILE = "output.wav"
SPEECH_DIR = "speech"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over `path`.
    The file gets the mode a plain open() would give it (mkstemp's is 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(
        path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    )


def wav_bytes(waveform: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> bytes:
    """A 16-bit PCM WAV file in memory (what the server sends)."""
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, waveform, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(wav_bytes(waveform, sample_rate)))


def save_result(output_dir: str, result: dict[str, Any], waveform: Optional[np.ndarray]) -> dict[str, Any]:
    """Write output.wav (if any) and then result.json, which names it; returns the result as saved."""
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


class ResultsFile:
    """OUTPUT_DIR/results.jsonl, written a batch at a time.

    Each batch's lines go out in one write, flushed to disk before the next batch starts.
    A fresh run leaves an earlier file in place until its own first batch replaces it; a
    resumed run keeps the whole lines already there (a line cut by a kill is dropped).
    """

    def __init__(self, output_dir: str, resume: bool):
        self.path = Path(output_dir) / RESULTS_FILE
        self.resume = resume
        self._started = False
        self.finished: dict[str, dict] = self._whole_lines() if resume else {}

    def _whole_lines(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        finished = {}
        for line in self.path.read_text(encoding="utf-8").split("\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # blank, or a line cut short
            finished[str(record["id"])] = record
        return finished

    def speech_path(self, position: int) -> Path:
        return self.path.parent / SPEECH_DIR / f"{position:05d}.wav"

    def append(self, records: list[dict]) -> None:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if not self._started:
            self._started = True
            kept = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.finished.values())
            _atomic_write(self.path, lambda tmp: Path(tmp).write_text(kept + lines, encoding="utf-8"))
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
