"""Write the sample media the demo and the tests use, offline and deterministically.

    python scripts/make_sample_media.py --output sample_media

Writes `image.png` (a colour pattern), `audio.wav` (16 kHz mono, 2.5 s: tones and
noise, longer than one 1 s audio-encoder chunk) and `video.mp4` (2 s, 4 fps, moving
pattern, with a mono AAC audio track). The video is encoded by the `ffmpeg` program
with bit-exact flags so that the same command gives the same bytes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

AUDIO_RATE = 16000
AUDIO_SECONDS = 2.5
VIDEO_SIZE = 64
VIDEO_FPS = 4
VIDEO_SECONDS = 2


def make_image(size: tuple[int, int] = (96, 64)):
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // width), (y * 255 // height), ((x // 8 + y // 8) % 2) * 255], axis=-1).astype(
        np.uint8
    )
    return Image.fromarray(pixels, "RGB")


def make_audio(seconds: float = AUDIO_SECONDS, rate: int = AUDIO_RATE, seed: int = 0) -> np.ndarray:
    """A rising tone, a fixed chord and a little noise: not silence, not periodic."""
    t = np.arange(int(seconds * rate)) / rate
    chirp = np.sin(2 * np.pi * (220 + 180 * t) * t)
    chord = 0.5 * np.sin(2 * np.pi * 330 * t) + 0.3 * np.sin(2 * np.pi * 550 * t)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    wave = 0.3 * (chirp + chord) + noise
    return (wave / np.abs(wave).max() * 0.8).astype(np.float32)


def make_video_frames(size: int = VIDEO_SIZE, fps: int = VIDEO_FPS, seconds: int = VIDEO_SECONDS) -> np.ndarray:
    frames = []
    y, x = np.mgrid[0:size, 0:size]
    for i in range(fps * seconds):
        shift = i * 4
        frame = np.stack([((x + shift) * 4) % 256, (y * 4) % 256, (((x + shift) // 8 + y // 8) % 2) * 200], axis=-1)
        frames.append(frame.astype(np.uint8))
    return np.stack(frames)


def write_video(path: Path, frames: np.ndarray, audio: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """Encode frames and a mono track into an mp4 with the ffmpeg program (no shell)."""
    import soundfile as sf

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("error: the ffmpeg program is needed to write video.mp4; install it (apt-get install ffmpeg)")
    n, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        raw, wav = Path(tmp) / "frames.rgb", Path(tmp) / "track.wav"
        raw.write_bytes(frames.tobytes())
        sf.write(wav, audio, AUDIO_RATE, subtype="PCM_16")
        command = [
            ffmpeg,
            "-y",
            "-loglevel",
            "error",
            "-threads",
            "1",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(fps),
            "-i",
            str(raw),
            "-i",
            str(wav),
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "mpeg4",
            "-q:v",
            "2",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-ac",
            "1",
            "-ar",
            str(AUDIO_RATE),
            "-shortest",
            "-fflags",
            "+bitexact",
            "-flags",
            "+bitexact",
            "-map_metadata",
            "-1",
            str(path),
        ]
        subprocess.run(command, check=True)


def build_media(output: Path) -> dict[str, Path]:
    import soundfile as sf

    output.mkdir(parents=True, exist_ok=True)
    paths = {name: output / name for name in ("image.png", "audio.wav", "video.mp4")}
    make_image().save(paths["image.png"])
    sf.write(paths["audio.wav"], make_audio(), AUDIO_RATE, subtype="PCM_16")
    video_track = make_audio(seconds=VIDEO_SECONDS, seed=1)
    write_video(paths["video.mp4"], make_video_frames(), video_track)
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to write the media into")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, Path]:
    args = parse_args(argv)
    paths = build_media(Path(args.output))
    print("sample media written:", ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
