#!/usr/bin/env bash
# sparsec GPU check: the kernels' GPU tests, then the attention and sparse-delta benchmarks.
#
#   OUT=/path/to/logs tools/gpu_check.sh          # from the repository root or anywhere
#   QUICK=1 tools/gpu_check.sh                    # shorter benchmarks (fewer configurations)
#
# Needs a CUDA GPU with torch and triton (written for an H100, torch 2.11, triton 3.6; no
# internet needed). Writes to $OUT (default ./gpu_check_out): gpu_tests.log,
# bench_attention.log/.json, bench_sparse_delta.log/.json, summary.txt (and
# bench_triton_backend.log/.json if time is left). Each step has a time limit (3 + 4 + 1
# minutes; the optional backend step 1.5, started only before minute 6), so the whole run
# stays under 8 minutes. A failing step does not stop the later ones (each benchmark checks
# its own results before timing), but the script exits 1 and says which step failed. The
# summary tables are printed last.
set -uo pipefail

TOOL=gpu_check
source "$(dirname "$0")/gpu_lib.sh"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
QUICK_ARGS=()
[ "${QUICK:-0}" = "1" ] && QUICK_ARGS=(--quick)

# preflight: stop here if there is no GPU or sparsec and its kernels cannot load
preflight_kernels

step "gpu tests" 180 gpu_tests.log \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider --maxfail=20 -rfs \
  tests/kernels tests/backends tests/ops
step "bench_attention" 240 bench_attention.log \
  "$PY" tools/bench_attention.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"}
step "bench_sparse_delta" 60 bench_sparse_delta.log \
  "$PY" tools/bench_sparse_delta.py ${QUICK_ARGS[@]+"${QUICK_ARGS[@]}"}
# optional: the backend end to end (dense parts eager vs torch.compile), if time is left
if [ $(( $(date +%s) - START )) -lt 360 ] && [ "${QUICK:-0}" != "1" ]; then
  step "bench_triton_backend" 90 bench_triton_backend.log "$PY" tools/bench_triton_backend.py
else
  echo "== bench_triton_backend skipped (time) =="
fi

{
  echo
  echo "================ summary ($(( $(date +%s) - START ))s) ================"
  echo "-- gpu tests:"
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -n 20
  echo "-- attention (ms, speedups):"
  sed -n '/, torch .*, triton .*: batch/,$p' "$OUT/bench_attention.log" | tail -n 40
  echo "-- sparse delta (ms):"
  sed -n '/, torch .*, triton .*: weight/,$p' "$OUT/bench_sparse_delta.log" | tail -n 30
  if [ -f "$OUT/bench_triton_backend.log" ]; then
    echo "-- triton backend (forward ms):"
    sed -n '/: Llama dim/,$p' "$OUT/bench_triton_backend.log" | tail -n 6
  fi
  verdict
} 2>&1 | tee -a "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ] || exit 1
