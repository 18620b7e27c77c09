#!/usr/bin/env bash
# The full test suite on a fresh machine: set-up, the benchmark in a short configuration
# (figures printed for the log, never asserted), then pytest. CI runs exactly this.
#
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "$ROOT/requirements-test.txt"
cd "$ROOT"

echo "== benchmark (short configuration; figures depend on the machine)"
python scripts/benchmark.py --model_name "$TINY_CKPT" --device_target CPU --media_dir "$SAMPLE_MEDIA" \
  --prompt_tokens 32 128 --new_tokens 8 --repeats 1 --variant all --json "${TMPDIR:-/tmp}/benchmark_ci.json" 2>/dev/null

echo "== tests"
python -m pytest "$@"
