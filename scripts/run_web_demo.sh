#!/usr/bin/env bash
# web_demo.py on Ascend with msrun: 2 workers, ZeRO-3 (or --parallel expert); rank 0 serves
# the browser UI and the OpenAI-compatible API on --host:--port (default 127.0.0.1:7860).
# Which mode: --parallel expert when each card can hold the whole attention (2 x 64 GB cards: 35.9 GiB a
# card against zero3's 33.3): one all-reduce of the hidden state per MoE layer, 384 KiB a decoded token
# against zero3's 5.7 GiB of gathered weights (scripts/plan_memory.py); zero3 when memory is tighter.
# Extra arguments go to the script, e.g.
#   bash scripts/run_web_demo.sh --port 7860 --parallel expert
# WORKER_NUM, MASTER_PORT, LOG_DIR, CLUSTER_TIME_OUT and MODEL_NAME override the launch (see msrun_launch.sh).
# CLUSTER_TIME_OUT is also how long the ranks wait for one another: a server idles between requests
# inside a broadcast, so the default here is -1 (wait for the next request without end).
set -euo pipefail
MODEL_NAME="${MODEL_NAME:-Qwen/Qwen3-Omni-30B-A3B-Instruct}"
CLUSTER_TIME_OUT="${CLUSTER_TIME_OUT:--1}" exec bash "$(dirname "$0")/msrun_launch.sh" web_demo.py --model_name "$MODEL_NAME" "$@"
