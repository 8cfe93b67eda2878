#!/usr/bin/env bash
# sparsec GPU: the GPU tests (kernels, ops, backends), then the whole-model
# benchmark of an unmodified HF Llama at 16k tokens (tools/bench_models.py), in one run.
#
#   OUT=/path/to/logs tools/gpu_models.sh
#   TESTS="tests/passes/test_causal_canonical.py" BENCH_ARGS="--rows full-eager,sparsec-compile \
#     --profile" tools/gpu_models.sh      # other GPU tests, other bench_models arguments
#
# Writes $OUT/gpu_tests.log, bench_models.log, bench_models_16k.json and summary.txt. Limits:
# tests 200 s, benchmark 330 s, the whole run under 9 minutes.
set -uo pipefail

TOOL=gpu_models
DEADLINE=550
source "$(dirname "$0")/gpu_lib.sh"

preflight_kernels

step "gpu tests" 200 gpu_tests.log \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --maxfail=30 -rfs --timeout=150 \
  ${TESTS:-tests/kernels tests/ops tests/backends}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
step "bench_models 16k" 330 bench_models.log \
  "$PY" tools/bench_models.py --seq-len 16384 --json "$OUT/bench_models_16k.json" ${BENCH_ARGS:-}

{
  echo
  echo "================ summary ($(( $(date +%s) - START ))s) ================"
  echo "-- gpu tests:"
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -n 30
  echo "-- bench_models:"
  tail -n 40 "$OUT/bench_models.log"
  verdict
} 2>&1 | tee -a "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ] || exit 1
