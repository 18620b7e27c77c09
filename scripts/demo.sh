#!/usr/bin/env bash
# The demo on a machine without an NPU: omni_understanding.py under msrun with 2 CPU workers,
# on the tiny random-weight checkpoint, with the sample image and audio, speaking its answer.
# Random weights give meaningless words: this shows the pipeline runs, not what the model knows.
#
#   bash scripts/demo.sh
#
# stdout: the answer and where the files are. Set-up progress goes to stderr, the workers' logs to
# LOG_DIR; if the run fails, its error goes to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
OUTPUT_DIR="${OUTPUT_DIR:-$ROOT/outputs/demo}"
LOG_DIR="${LOG_DIR:-$ROOT/outputs/demo_msrun_log}"
mkdir -p "$LOG_DIR"

echo "== running omni_understanding.py on 2 CPU workers (msrun), tiny random checkpoint; logs in $LOG_DIR" >&2
if ! WORKER_NUM=2 BIND_CORE=False LOG_DIR="$LOG_DIR" MASTER_PORT="${MASTER_PORT:-8118}" \
  bash scripts/msrun_launch.sh omni_understanding.py \
  --device_target CPU \
  --model_name "$TINY_CKPT" \
  --image "$SAMPLE_MEDIA/image.png" \
  --audio "$SAMPLE_MEDIA/audio.wav" \
  --prompt "What can you see and hear? Answer in one short sentence." \
  --max_new_tokens 16 \
  --return_audio \
  --talker_max_new_tokens 16 \
  --output_dir "$OUTPUT_DIR" >/dev/null; then
  echo "error: the demo failed; the workers' logs are in $LOG_DIR" >&2
  exit 1
fi

python - "$OUTPUT_DIR/result.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print("answer (tiny random weights, so meaningless words):", repr(result["text"]))
print("speech:", result["audio"])
print("result:", sys.argv[1])
PY
echo "For real answers run a released checkpoint on Ascend: bash scripts/run_omni_understanding.sh --image ... --prompt ... (see README)." >&2
