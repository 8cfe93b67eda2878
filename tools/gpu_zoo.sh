#!/usr/bin/env bash
# sparsec GPU zoo: every sparsec.testing.zoo model through every feature on the GPU (bf16,
# CUDA, --backend triton; sequence 2048, ONNX cells float32 at 512 in onnxruntime's CPU build).
#
#   OUT=/path/to/logs tools/gpu_zoo.sh          # from the repository root or anywhere
#   QUICK=1 tools/gpu_zoo.sh                    # sequence 512
#   MODELS=minilm,nanogpt,convmlp tools/gpu_zoo.sh   # some models only (a second call finishes
#                                               # a sweep that ran past the deadline)
#
# Writes $OUT/zoo_table.md (the table for docs/zoo.md), $OUT/zoo_cells.json, gpu_zoo.log and
# summary.txt. One step with a 520 s limit; the driver itself stops starting cells after
# 480 s (shown as "time"), so the run stays under 9 minutes.
set -uo pipefail

TOOL=gpu_zoo
DEADLINE=540
source "$(dirname "$0")/gpu_lib.sh"
ARGS=()
[ "${QUICK:-0}" = "1" ] && ARGS=(--quick)
[ -n "${MODELS:-}" ] && ARGS+=(--models "$MODELS")

preflight_kernels

step "zoo matrix" 520 gpu_zoo.log \
  "$PY" tools/gpu_zoo.py --device cuda --deadline 480 --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}

{
  echo
  echo "================ summary ($(( $(date +%s) - START ))s) ================"
  [ -f "$OUT/zoo_table.md" ] && cat "$OUT/zoo_table.md"
  verdict
} 2>&1 | tee -a "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ] || exit 1
