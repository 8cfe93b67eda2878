#!/usr/bin/env bash
# sparsec GPU: the GPU tests (kernels, ops, backends), then the whole-model
# benchmark of an unmodified HF Llama at 16k tokens (tools/bench_models.py), in one run.
#
#   OUT=/path/to/logs tools/gpu_models.sh
#   TESTS="tests/passes/test_causal_canonical.py" TESTS_LIMIT=90 BENCH_LIMIT=450 BENCH_ARGS="--rows full-eager,sparsec-compile \
#     --profile" tools/gpu_models.sh      # other GPU tests, other bench_models arguments
#
# With ZOO_FEATURES set, the zoo's cells of those features run between the two (zoo.log).
# Writes $OUT/gpu_tests.log, bench_models.log, bench_models_16k.json and summary.txt. Limits:
# tests 200 s, benchmark 330 s, the whole run under 9 minutes.
set -uo pipefail

TOOL=gpu_models
DEADLINE=${DEADLINE:-550}
source "$(dirname "$0")/gpu_lib.sh"

preflight_kernels

step "gpu tests" "${TESTS_LIMIT:-200}" gpu_tests.log \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --maxfail=30 -rfs --timeout=150 \
  ${TESTS:-tests/kernels tests/ops tests/backends}
if [ -n "${ZOO_FEATURES:-}" ]; then  # e.g. ZOO_FEATURES=joint,attention ZOO_LIMIT=150
  step "zoo ${ZOO_FEATURES}" "${ZOO_LIMIT:-150}" zoo.log \
    "$PY" tools/gpu_zoo.py --device cuda --features "$ZOO_FEATURES" \
    --deadline $(( ${ZOO_LIMIT:-150} - 20 )) --out "$OUT/zoo"
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
step "bench_models 16k" "${BENCH_LIMIT:-330}" bench_models.log \
  "$PY" tools/bench_models.py --seq-len 16384 --json "$OUT/bench_models_16k.json" ${BENCH_ARGS:-}

{
  echo
  echo "================ summary ($(( $(date +%s) - START ))s) ================"
  echo "-- gpu tests:"
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -n 30
  [ -f "$OUT/zoo.log" ] && { echo "-- zoo:"; grep -E "cells pass|FAILED|fail" "$OUT/zoo.log" | tail -n 12; }
  echo "-- bench_models:"
  tail -n 40 "$OUT/bench_models.log"
  verdict
} 2>&1 | tee -a "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ] || exit 1
