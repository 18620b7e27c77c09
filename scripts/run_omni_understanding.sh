#!/usr/bin/env bash
# omni_understanding.py on Ascend with msrun: 2 workers, ZeRO-3 (or --parallel expert).
# Which mode: --parallel expert when each card can hold the whole attention (2 x 64 GB cards: 35.9 GiB a
# card against zero3's 33.3): one all-reduce of the hidden state per MoE layer, 384 KiB a decoded token
# against zero3's 5.7 GiB of gathered weights (scripts/plan_memory.py); zero3 when memory is tighter.
# Extra arguments go to the script, e.g.
#   bash scripts/run_omni_understanding.sh --image cars.jpg --prompt "What is this?"
# WORKER_NUM, MASTER_PORT, LOG_DIR, CLUSTER_TIME_OUT and MODEL_NAME override the launch (see msrun_launch.sh).
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: bash scripts/run_omni_understanding.sh --image cars.jpg --prompt \"What is this?\"  (python omni_understanding.py --help lists every flag)" >&2
  exit 2
fi
MODEL_NAME="${MODEL_NAME:-Qwen/Qwen3-Omni-30B-A3B-Instruct}"
exec bash "$(dirname "$0")/msrun_launch.sh" omni_understanding.py --model_name "$MODEL_NAME" "$@"
