#!/usr/bin/env bash
# The full test suite on a fresh machine: set-up, then pytest. CI runs exactly this.
#
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh" "$ROOT/requirements-test.txt"
cd "$ROOT"
python -m pytest "$@"
