#!/usr/bin/env bash
# Launch one example script on N workers with msrun (the model spread over them as --parallel
# says: ZeRO-3 by default). Settings come from the environment; every other argument goes to
# the script.
#
#   WORKER_NUM=2 MASTER_PORT=8118 LOG_DIR=msrun_log CLUSTER_TIME_OUT=300 \
#     bash scripts/msrun_launch.sh omni_understanding.py --model_name ... --image ...
#
# stdout is rank 0's own stdout, as it is written: the answer (or the server's address), nothing
# else. The workers' logs stay in LOG_DIR/worker_<rank>.log (rank 0's stderr included), msrun's own
# output in LOG_DIR/msrun_console.log. If the run fails, its error goes to stderr.
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
# Each worker bound to its own cores on an Ascend host; not on a CPU machine, where the workers share the cores.
case " $* " in
  *" --device_target CPU "* | *" --device_target=CPU "*) BIND_CORE="${BIND_CORE:-False}" ;;
  *) BIND_CORE="${BIND_CORE:-True}" ;;
esac
# On Ascend, choose the cards: export ASCEND_RT_VISIBLE_DEVICES=0,1
# MindSpore's C++ logs at error level only: its start-up warnings (dozens of "Failed to connect
# to the meta server" retries while the workers find each other) are normal. GLOG_v=2 shows them.
export GLOG_v="${GLOG_v:-3}"

mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/worker_*.log  # msrun writes them anew; gone, they tell when this run's workers have started
RANK0_STDOUT="$LOG_DIR/worker_0_stdout.log"
: >"$RANK0_STDOUT"
export OMNI_RANK0_STDOUT="$RANK0_STDOUT"  # rank 0 writes its stdout there (omni_helpers.runtime.stdout_for_the_launcher)

msrun \
  --bind_core="$BIND_CORE" \
  --worker_num="$WORKER_NUM" \
  --local_worker_num="$WORKER_NUM" \
  --master_port="$MASTER_PORT" \
  --log_dir="$LOG_DIR" \
  --join=True \
  --cluster_time_out="$CLUSTER_TIME_OUT" \
  "$ROOT/$SCRIPT" "$@" >"$LOG_DIR/msrun_console.log" 2>&1 &
MSRUN=$!
# msrun's own loop watches its workers without pause: once they are started, it yields the cores to them.
( for _ in $(seq 1200); do
    [ -f "$LOG_DIR/worker_$((WORKER_NUM - 1)).log" ] && { renice -n 19 -p "$MSRUN" >/dev/null 2>&1; exit 0; }
    kill -0 "$MSRUN" 2>/dev/null || exit 0
    sleep 0.1
  done ) &
# Ctrl+C or a stop: msrun stops every worker on SIGINT (a background job ignores the terminal's own).
trap 'kill -INT "$MSRUN" 2>/dev/null || true' INT TERM
tail -n +1 -f --pid="$MSRUN" "$RANK0_STDOUT" &  # rank 0's stdout as it is written, to the end
TAIL=$!

STATUS=0
wait "$MSRUN" || STATUS=$?
while kill -0 "$MSRUN" 2>/dev/null; do  # a signal interrupted the wait: wait for msrun to stop its workers
  STATUS=0
  wait "$MSRUN" || STATUS=$?
done
wait "$TAIL" || true
if [ "$STATUS" -ne 0 ]; then
  # A bad request or flag: its one-line error, as the script prints it in one process. Every rank checks the
  # same request, and msrun stops the others as soon as one exits, so whichever rank printed it first.
  FIRST_ERROR="$(grep -h -m 1 "^error: " "$LOG_DIR"/worker_*.log 2>/dev/null | head -n 1 || true)"
  if [ -n "$FIRST_ERROR" ]; then
    echo "$FIRST_ERROR" >&2
    exit 2
  fi
  tail -n 20 "$LOG_DIR/worker_0.log" >&2 2>/dev/null || true
  echo "error: the run failed (msrun exited with $STATUS); the workers' logs are in $LOG_DIR" >&2
fi
exit "$STATUS"
