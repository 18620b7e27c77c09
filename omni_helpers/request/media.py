"""Media files: fetching what a request points at, and checking that it decodes.

Everything here runs before any weights load and imports nothing heavy: a typo, a dead
URL or a truncated file must cost a second, not a 65 GB load. URLs (`http(s)://` and
`data:`) are fetched once into a folder of the run's own and the conversation is pointed
at the copies, so the model's preprocessing reads local files only; images are decoded
with PIL, audio and video are probed with ffprobe (streams, duration, frame rate).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import mimetypes
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omni_helpers.request.conversation import Conversation, local_path, map_media
from omni_helpers.request.errors import RequestError

FETCH_TIMEOUT_SECONDS = 60
MAX_FETCH_BYTES = 2 * 2**30  # a bound on one download; a 2-hour 1080p video fits
FRAME_FACTOR = 2  # qwen_omni_utils samples at least two frames of a video range


def is_remote(reference: str) -> bool:
    return reference.startswith(("http://", "https://", "data:"))


# ----------------------------------------------------------------------------- fetching


def _suffix_for(kind: str, reference: str, content_type: Optional[str]) -> str:
    suffix = Path(urllib.parse.urlparse(reference).path).suffix if not reference.startswith("data:") else ""
    if not suffix and content_type:
        suffix = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
    return suffix or {"image": ".png", "audio": ".wav", "video": ".mp4"}[kind]


def _decode_data_url(kind: str, reference: str) -> tuple[bytes, Optional[str]]:
    header, _, payload = reference.partition(",")
    if ";base64" not in header:
        raise RequestError(
            f"{kind} {reference[:40]}...: only base64 data: URLs are supported; encode the file in base64"
        )
    try:
        return base64.b64decode(payload, validate=True), header[len("data:") :].split(";")[0] or None
    except (binascii.Error, ValueError) as error:
        raise RequestError(
            f"{kind} {reference[:40]}...: the base64 data is corrupt ({error}); re-encode the file"
        ) from error


def _download(kind: str, url: str) -> tuple[bytes, Optional[str]]:
    request = urllib.request.Request(url, headers={"User-Agent": "qwen3-omni-mindspore-examples"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
            data = response.read(MAX_FETCH_BYTES + 1)
            content_type = response.headers.get("Content-Type")
    except urllib.error.HTTPError as error:
        raise RequestError(f"{kind} {url}: the server answered HTTP {error.code}; check the URL") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise RequestError(
            f"{kind} {url}: cannot be fetched ({reason}); check the URL and the network, "
            "or download the file and pass its path"
        ) from error
    if len(data) > MAX_FETCH_BYTES:
        raise RequestError(
            f"{kind} {url}: larger than {MAX_FETCH_BYTES // 2**30} GiB; download it and pass a shorter file"
        )
    return data, content_type


def fetch_remote_media(conversation: Conversation, folder: Path) -> Conversation:
    """A copy of `conversation` whose http(s):// and data: media are files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)

    def fetch(item: dict) -> dict:
        kind, reference = item["type"], item[item["type"]]
        if not is_remote(reference):
            return item
        if reference.startswith("data:"):
            data, content_type = _decode_data_url(kind, reference)
        else:
            data, content_type = _download(kind, reference)
        target = folder / f"{len(list(folder.iterdir())):04d}_{kind}{_suffix_for(kind, reference, content_type)}"
        target.write_bytes(data)
        item[kind] = str(target)
        return item

    return map_media(conversation, fetch)


# ----------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class Probe:
    streams: tuple[str, ...]  # codec types: "audio", "video"
    duration: Optional[float]  # seconds
    video_fps: Optional[float]  # native frames per second of the first video stream


def _rate(text: Optional[str]) -> Optional[float]:
    try:
        numerator, _, denominator = (text or "").partition("/")
        value = float(numerator) / float(denominator or 1)
        return value if value > 0 and math.isfinite(value) else None
    except (ValueError, ZeroDivisionError):
        return None


def probe(path: Path) -> Probe:
    """What ffprobe finds in a file (no streams if it cannot decode it)."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        raise RequestError("the ffprobe program is missing; install ffmpeg (apt-get install ffmpeg)")
    run = subprocess.run(
        [
            ffprobe,
            "-v",
            "error",
            "-of",
            "json",
            "-show_entries",
            "stream=codec_type,avg_frame_rate:format=duration",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0:
        return Probe((), None, None)
    found = json.loads(run.stdout or "{}")
    streams = found.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), {})
    try:
        duration = float(found.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        duration = None
    return Probe(tuple(s.get("codec_type") for s in streams), duration, _rate(video.get("avg_frame_rate")))


# ----------------------------------------------------------------------------- checking


def readable_file(kind: str, reference: str) -> Path:
    path = local_path(reference)
    if not path.is_file():
        raise RequestError(f"{kind} {reference}: no such file; check the path")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise RequestError(f"{kind} {reference}: cannot be read ({error.strerror}); check its permissions") from error
    return path


def check_image(item: dict) -> None:
    from PIL import Image

    reference = item["image"]
    path = readable_file("image", reference)
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many kinds for broken files
        raise RequestError(
            f"image {reference}: not a readable image ({type(error).__name__}); give a PNG/JPEG file"
        ) from error


def check_time_range(
    kind: str, reference: str, item: dict, duration: Optional[float], video_fps: Optional[float]
) -> None:
    """`<kind>_start`/`<kind>_end` (seconds) and `fps` against the clip, as qwen_omni_utils will read them."""
    start, end = item.get(f"{kind}_start"), item.get(f"{kind}_end")
    for name, value in ((f"{kind}_start", start), (f"{kind}_end", end), ("fps", item.get("fps"))):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise RequestError(f"{kind} {reference}: {name} {value!r} is not a number of seconds", name)
    if item.get("fps") is not None and item["fps"] <= 0:
        raise RequestError(f"{kind} {reference}: fps {item['fps']} must be positive (2 is the usual)", "fps")
    if start is not None and start < 0:
        raise RequestError(
            f"{kind} {reference}: {kind}_start {start} is negative; give seconds from the beginning", f"{kind}_start"
        )
    if start is not None and end is not None and end <= start:
        raise RequestError(
            f"{kind} {reference}: {kind}_end {end} is not after {kind}_start {start}; swap or fix them", f"{kind}_end"
        )
    if duration is None:
        return
    if start is not None and start >= duration:
        raise RequestError(
            f"{kind} {reference}: {kind}_start {start} is past the end of the clip ({duration:.2f} s); give a start inside it",
            f"{kind}_start",
        )
    if kind == "video" and video_fps and (start is not None or end is not None):
        first = math.ceil((start or 0.0) * video_fps)
        last = math.floor(min(end if end is not None else duration, duration) * video_fps)
        if last - first + 1 < FRAME_FACTOR:
            raise RequestError(
                f"video {reference}: the range {start or 0}-{end if end is not None else duration:.2f} s holds fewer than "
                f"{FRAME_FACTOR} frames at {video_fps:.3g} fps; give a longer range",
                "video_end",
            )


def seconds_used(kind: str, item: dict, duration: Optional[float]) -> float:
    """How much of a clip a request uses: its `<kind>_start`/`<kind>_end` range, within the clip."""
    if duration is None:
        return 0.0
    start, end = item.get(f"{kind}_start") or 0.0, item.get(f"{kind}_end")
    return max(0.0, min(duration, end if end is not None else duration) - start)


def probe_audio(path: Path) -> Probe:
    """An audio file's duration, read from its header in-process where libsndfile reads the format (WAV, FLAC,
    OGG, MP3: microseconds), else by `probe`. ffprobe is a process of its own: 70 ms per file here, and several
    times that while a server's generation keeps the cores busy, all of it before the request can join a batch."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, ValueError):
        return probe(path)
    if info.frames <= 0 or info.samplerate <= 0:
        return probe(path)
    return Probe(("audio",), info.frames / info.samplerate, None)


def check_audio(item: dict) -> float:
    """The seconds of the clip the item uses, once checked."""
    reference = item["audio"]
    found = probe_audio(readable_file("audio", reference))
    if "audio" not in found.streams:
        raise RequestError(f"audio {reference}: no decodable audio in it; give a WAV/FLAC/MP3 file")
    check_time_range("audio", reference, item, found.duration, None)
    return seconds_used("audio", item, found.duration)


def check_video(item: dict, use_audio_in_video: bool) -> float:
    """The seconds of the clip the item uses, once checked."""
    reference = item["video"]
    found = probe(readable_file("video", reference))
    if "video" not in found.streams:
        raise RequestError(f"video {reference}: no decodable video in it (truncated or not a video?); give an MP4 file")
    if use_audio_in_video and "audio" not in found.streams:
        raise RequestError(
            f"video {reference}: it has no audio track; pass --no-use_audio_in_video to watch it silently",
            "use_audio_in_video",
        )
    check_time_range("video", reference, item, found.duration, found.video_fps)
    return seconds_used("video", item, found.duration)


def check_media(item: dict, use_audio_in_video: bool) -> dict[str, float]:
    """One local media item: readable, decodable, and its time range inside the clip. Returns the seconds of
    audio and video it adds to its request (a video heard with its soundtrack adds as much audio), from the same
    probe: a server checks them against its limits (`validation.check_request_seconds`)."""
    if item["type"] == "image":
        check_image(item)
        return {}
    if item["type"] == "audio":
        return {"audio": check_audio(item)}
    seconds = check_video(item, use_audio_in_video)
    return {"video": seconds, "audio": seconds} if use_audio_in_video else {"video": seconds}
