#!/usr/bin/env bash
# sparsec GPU tuning run (issue 6, fourth round): benchmarks with their baselines, then tests.
#
#   OUT=/path/to/logs tools/gpu_tune.sh        # from the repository root or anywhere
#
# Steps, in order, each with a time limit and all under one deadline (DEADLINE seconds,
# default 470: the whole run fits in 8 minutes; a step that would start with less than 20 s
# left is skipped and reported):
#   1. attention     tools/bench_attention.py: SDPA, Flex and the sparsec variants v2 (the
#                    default: backward chosen per shape), v2-split, v2-atomic; every variant
#                    checked against Flex before timing                       -> bench_attention.log/.json
#   2. sparse delta  tools/bench_sparse_delta.py: sampled (v5) and its other form, dense, auto
#                    (choice made three times afresh per density), a tile sweep at 0.1%
#                                                                             -> bench_sparse_delta.log/.json
#   3. gpu tests     pytest -m gpu tests/kernels tests/ops tests/backends    -> gpu_tests.log
# Last it prints the summary: test result, the tables, and tools/goals.py (each goal, the
# measured ratio, met or missed); the same goes to $OUT/summary.txt. Exit status 1 if a step
# failed or timed out. Needs a CUDA GPU with torch and triton (written for the H100, torch
# 2.11, triton 3.6); Python packages the machine lacks travel as wheels in .whl/.
# (tools/profile_attention.py and tools/host_overhead.py, steps of the second round, run alone.)
set -uo pipefail

TOOL=gpu_tune
DEADLINE=${DEADLINE:-470}
source "$(dirname "$0")/gpu_lib.sh"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

preflight_kernels

# the benchmarks first (each checks its variants before timing them), so a slow test step
# cannot cost the measurements; the tests get what is left of the deadline
step "bench_attention" 230 bench_attention.log \
  "$PY" tools/bench_attention.py --variants v2,v2-split,v2-atomic
step "bench_sparse_delta" 120 bench_sparse_delta.log "$PY" tools/bench_sparse_delta.py
step "gpu tests" 280 gpu_tests.log \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --maxfail=20 -rfs \
  tests/kernels tests/ops tests/backends

{
  echo
  echo "================ summary ($(( $(date +%s) - START ))s) ================"
  echo "-- gpu tests:"
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 1
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" 2>/dev/null | head -n 20
  echo "-- attention (ms, speedups; sparsec = v2):"
  sed -n '/, torch .*, triton .*: batch/,$p' "$OUT/bench_attention.log" 2>/dev/null | tail -n 40
  echo "-- sparse delta (ms):"
  sed -n '/, torch .*, triton .*: weight/,$p' "$OUT/bench_sparse_delta.log" 2>/dev/null \
    | tail -n 20
  echo "-- goals:"
  "$PY" tools/goals.py "$OUT"
  verdict
} 2>&1 | tee -a "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ] || exit 1
