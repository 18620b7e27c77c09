#!/usr/bin/env bash
# Make a fresh machine ready: the ffmpeg program, a virtual environment with the pinned
# requirements, the tiny checkpoint and the sample media. Safe to run again.
#
#   source scripts/setup_env.sh [requirements file]
#
# The first run installs about 9 GB into .venv (PyPI's x86_64 torch wheel, which
# qwen-omni-utils needs, carries CUDA libraries) and takes about 4 minutes. Progress goes
# to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="${1:-$ROOT/requirements.txt}"
VENV="${VENV:-$ROOT/.venv}"

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "== installing the ffmpeg program (apt-get)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV" >&2
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
echo "== installing $(basename "$REQUIREMENTS") (about 9 GB and 4 minutes the first time)" >&2
python -m pip install -q --upgrade pip
python -m pip install -q -r "$REQUIREMENTS"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TINY_CKPT="${TINY_CKPT:-$ROOT/tiny_ckpt}"
SAMPLE_MEDIA="${SAMPLE_MEDIA:-$ROOT/sample_media}"
[ -f "$TINY_CKPT/config.json" ] || python "$ROOT/scripts/make_tiny_checkpoint.py" --output "$TINY_CKPT" >&2
[ -f "$SAMPLE_MEDIA/video.mp4" ] || python "$ROOT/scripts/make_sample_media.py" --output "$SAMPLE_MEDIA" >&2
export TINY_CKPT SAMPLE_MEDIA
