#!/usr/bin/env bash
# The full test suite on a fresh machine: set-up, the benchmark in a short configuration
# (figures printed for the log, never asserted), then pytest. CI runs exactly this.
#
#   bash scripts/test.sh [pytest arguments]      (e.g. -m "not slow": the fast tests alone, a few minutes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "== installing Debian's chromium and chromium-driver (the web demo's browser test)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "$ROOT/requirements-test.txt"
cd "$ROOT"

echo "== benchmark (short configuration; figures depend on the machine)"
python scripts/benchmark.py --model_name "$TINY_CKPT" --device_target CPU --media_dir "$SAMPLE_MEDIA" \
  --prompt_tokens 32 --new_tokens 8 --repeats 1 --variant all --batch_sizes 1 8 --startup \
  --json "${TMPDIR:-/tmp}/benchmark_ci.json" 2>/dev/null

echo "== benchmark under msrun, 2 CPU workers: --parallel zero3 against expert (rank 0's figures)"
BENCH_LOG="${TMPDIR:-/tmp}/benchmark_msrun_log"
WORKER_NUM=2 BIND_CORE=False LOG_DIR="$BENCH_LOG" \
  MASTER_PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
  bash scripts/msrun_launch.sh scripts/benchmark.py --model_name "$TINY_CKPT" --device_target CPU \
  --media_dir "$SAMPLE_MEDIA" --prompt_tokens 32 --new_tokens 8 --repeats 1 --variant zero3 expert \
  --json "${TMPDIR:-/tmp}/benchmark_msrun_ci.json" >/dev/null
cat "${TMPDIR:-/tmp}/benchmark_msrun_ci.json"

echo "== tests"
python -m pytest "$@"
