"""The sample media: deterministic, decodable, and the video carries an audio track."""

from __future__ import annotations

import subprocess

import numpy as np
import soundfile as sf

from scripts.make_sample_media import build_media


def test_media_are_deterministic(sample_media, tmp_path):
    again = build_media(tmp_path)
    for name, path in again.items():
        assert path.read_bytes() == sample_media[name.split(".")[0]].read_bytes(), name


def test_audio_is_16k_mono_longer_than_a_chunk_and_not_silent(sample_media):
    wave, rate = sf.read(sample_media["audio"])
    assert rate == 16000 and wave.ndim == 1
    assert 2.0 <= len(wave) / rate <= 5.0
    assert np.sqrt(np.mean(wave**2)) > 0.05


def test_video_has_frames_and_an_audio_track(sample_media):
    import decord

    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0", str(sample_media["video"])],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sorted(probe.stdout.split()) == ["audio", "video"]
    assert len(decord.VideoReader(str(sample_media["video"]))) == 8


def test_image_decodes(sample_media):
    from PIL import Image

    with Image.open(sample_media["image"]) as image:
        assert image.mode == "RGB" and image.size == (96, 64)
