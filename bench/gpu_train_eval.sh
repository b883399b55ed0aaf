#!/usr/bin/env bash
# The `default` preset on one GPU, end to end: train, verify, evaluate, with wall times.
# Run it on a GPU host (issue 4's goals are measured here):
#
#   bash bench/gpu_train_eval.sh [RUN_DIR] [extra --set options...]
#
# The default preset is 10,000 samples x 100 epochs; TRAIN_LIMIT (seconds, default 480) bounds
# training with SIGTERM, which saves a checkpoint and exits 143: evaluate then reports the model
# as far as it got, and the same command later resumes it. Output: the evaluation summary and
# RUN_DIR/eval/report.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/gpu-default}
shift || true
python=${PYTHON:-.venv/bin/python}  # the venv `make venv` builds, with the job installed (pip install -e .)
mkdir -p "$(dirname "$run")"  # for $run.train.log, written before the job creates $run
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

started=$(date +%s)
status=0
# --preserve-status: the job's own exit code (143 once it has saved after SIGTERM), not
# timeout's 124, which would also hide a failure on the way out.
timeout --preserve-status --signal=TERM --kill-after=30 "${TRAIN_LIMIT:-480}" \
  "$python" -m job train --preset default --run-uri "$run" "$@" > "$run.train.log" || status=$?
echo "train: exit $status after $(($(date +%s) - started)) s (143: stopped at the time limit after saving)"
[[ $status == 0 || $status == 143 ]] || exit "$status"

"$python" -m job verify --preset default --run-uri "$run" "$@" | grep -v '^{' | tail -3
started=$(date +%s)
"$python" -m job evaluate --preset default --run-uri "$run" "$@" | grep -v '^{'
echo "evaluate: $(($(date +%s) - started)) s"
