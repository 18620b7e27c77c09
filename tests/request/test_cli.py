"""The flags: defaults shown in --help, only the flags a script uses, --help answering at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

import audio_captioning
import omni_understanding
import video_understanding
from tests.script_runs import ROOT, script_env


def help_of(module) -> None:
    with pytest.raises(SystemExit) as done:
        module.parse_args(["--help"])
    assert done.value.code == 0


def test_help_shows_defaults_and_keeps_the_msrun_example(capsys):
    help_of(omni_understanding)
    text = capsys.readouterr().out
    assert "(default: 1024)" in text and "(default: Ethan)" in text and "(default: 1)" in text
    assert "--join=True --cluster_time_out=300 omni_understanding.py \\\n" in text  # line breaks kept


def test_captioning_lists_no_image_or_speech_flags(capsys):
    help_of(audio_captioning)
    text = capsys.readouterr().out
    for flag in ("--min_pixels", "--image", "--video", "--return_audio", "--speaker"):
        assert flag not in text
    help_of(video_understanding)
    assert "--video_start" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["omni_understanding.py", "audio_captioning.py", "video_understanding.py"])
def test_help_needs_no_heavy_import(script, tmp_path):
    """--help must not import MindSpore, mindone or torch: tens of seconds before a usage text."""
    for package in ("mindspore", "mindone", "torch", "torchvision"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('imported for --help')\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=script_env(PYTHONPATH=f"{tmp_path}:{ROOT}"),
    )
    assert done.returncode == 0 and "usage:" in done.stdout and done.stderr == ""


@pytest.mark.parametrize("given,meant", [("--max_tokens", "--max_new_tokens"), ("--voice", "--speaker")])
def test_a_flag_spelled_as_the_api_spells_it_names_the_flag_meant(given, meant):
    done = subprocess.run(
        [sys.executable, str(ROOT / "omni_understanding.py"), given, "16"],
        capture_output=True,
        text=True,
        timeout=60,
        env=script_env(),
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        f"unrecognized arguments: {given} 16 ({given} is spelled {meant} here)"
    )
