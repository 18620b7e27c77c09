#!/usr/bin/env bash
# The check before every commit: the fast tests (pytest -m "not slow": no script run end to end, no msrun),
# about 6 minutes on 2 cores, in the project's venv as scripts/setup_env.sh made it. Nothing is installed and
# no benchmark runs: scripts/test.sh (what CI runs) does those, then every test.
#
#   bash scripts/check.sh [pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "error: no .venv here; make it once with: source scripts/setup_env.sh requirements-test.txt" >&2
  exit 2
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
python -m pytest -m "not slow" "$@"
