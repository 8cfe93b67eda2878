#!/usr/bin/env bash
# sparsec distributed GPU check: the NCCL tests on 2 GPUs, then tools/bench_distributed.py on 1
# and on 2 GPUs (sparsec delta 1% vs full fine-tuning with DDP, 0.84B Llama-style, bf16).
#
#   OUT=/path/to/logs tools/gpu_distributed.sh     # from the repository root or anywhere
#
# Needs 2 CUDA GPUs of one host (written for 2×H200, torch 2.11; no internet needed). Writes to
# $OUT (default ./gpu_distributed_out): gpu_tests.log, bench_1gpu.log/dist_1gpu.json,
# bench_2gpu.log/dist_2gpu.json (the table, with the 1-GPU run as baseline) and summary.txt.
# Step limits 150 + 140 + 180 s keep the whole run under 8 minutes. A failing step does not
# stop the later ones, but the script exits 1 and names it. NVLink multicast stays off
# (NCCL_NVLS_ENABLE=0 unless the environment already sets it).
set -uo pipefail

TOOL=gpu_distributed
source "$(dirname "$0")/gpu_lib.sh"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

"$PY" - <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import sys
try:
    import torch
    import torch.distributed as dist
    import sparsec  # noqa: F401
except ImportError as e:
    sys.exit(f"gpu_distributed: preflight failed: {e}. Carry the missing package as a wheel in "
             ".whl/ (for tomli-w: pip download --no-deps tomli-w==1.2.0 -d .whl)")
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
if n < 2 or not dist.is_nccl_available():
    sys.exit(f"gpu_distributed: preflight failed: needs 2 CUDA GPUs and NCCL (GPUs: {n})")
print(f"preflight: {n} × {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

TORCHRUN=("$PY" -m torch.distributed.run --standalone)
step "nccl tests" 150 gpu_tests.log \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfs tests/test_distributed.py
step "bench 1 GPU" 140 bench_1gpu.log \
  "${TORCHRUN[@]}" --nproc-per-node 1 tools/bench_distributed.py --out "$OUT/dist_1gpu.json"
BASE=()
[ -f "$OUT/dist_1gpu.json" ] && BASE=(--baseline "$OUT/dist_1gpu.json")
step "bench 2 GPUs" 180 bench_2gpu.log \
  "${TORCHRUN[@]}" --nproc-per-node 2 tools/bench_distributed.py --out "$OUT/dist_2gpu.json" \
  ${BASE[@]+"${BASE[@]}"}

{
  echo
  echo "================ summary ($(( $(date +%s) - START ))s) ================"
  echo "-- nccl tests:"
  grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1
  grep -E "^FAILED|^ERROR|SKIPPED" "$OUT/gpu_tests.log" | head -n 20
  echo "-- scaling (1 → 2 GPUs):"
  sed -n '/ · torch .* · batch/,$p' "$OUT/bench_2gpu.log" | tail -n 12
  verdict
} 2>&1 | tee -a "$OUT/summary.txt"
[ ${#FAILED[@]} -eq 0 ] || exit 1
