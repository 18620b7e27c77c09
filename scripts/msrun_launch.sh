#!/usr/bin/env bash
# Launch one example script on N workers with msrun (the model spread over them as --parallel
# says: ZeRO-3 by default).
# Settings come from the environment; every other argument goes to the script.
#
#   WORKER_NUM=2 MASTER_PORT=8118 LOG_DIR=msrun_log CLUSTER_TIME_OUT=300 \
#     bash scripts/msrun_launch.sh omni_understanding.py --model_name ... --image ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ ! -f "$ROOT/$1" ]; then
  echo "usage: [WORKER_NUM=2 MASTER_PORT=8118 LOG_DIR=msrun_log CLUSTER_TIME_OUT=300 BIND_CORE=True] \\" >&2
  echo "  bash scripts/msrun_launch.sh SCRIPT.py [script arguments]   (SCRIPT.py relative to $ROOT)" >&2
  exit 2
fi
SCRIPT="$1"; shift

WORKER_NUM="${WORKER_NUM:-2}"
MASTER_PORT="${MASTER_PORT:-8118}"
LOG_DIR="${LOG_DIR:-msrun_log}"
CLUSTER_TIME_OUT="${CLUSTER_TIME_OUT:-300}"
# BIND_CORE=False on machines where binding workers to cores is not wanted (the CPU demo).
# On Ascend, choose the cards: export ASCEND_RT_VISIBLE_DEVICES=0,1
# MindSpore's C++ logs at error level only: its start-up warnings (dozens of "Failed to connect
# to the meta server" retries while the workers find each other) are normal. GLOG_v=2 shows them.
export GLOG_v="${GLOG_v:-3}"

msrun \
  --bind_core="${BIND_CORE:-True}" \
  --worker_num="$WORKER_NUM" \
  --local_worker_num="$WORKER_NUM" \
  --master_port="$MASTER_PORT" \
  --log_dir="$LOG_DIR" \
  --join=True \
  --cluster_time_out="$CLUSTER_TIME_OUT" \
  "$ROOT/$SCRIPT" "$@"
