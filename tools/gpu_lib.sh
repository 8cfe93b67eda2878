# Shared by the GPU scripts (tools/gpu_check.sh, gpu_tune.sh, gpu_distributed.sh); sourced, not
# run. Before sourcing, set TOOL (the script's name, for messages) and optionally DEADLINE (a
# step that would start with less than 20 s of it left is skipped). After sourcing: the
# repository root is the working directory, $OUT exists, $PY is the interpreter, the wheels in
# .whl/ are installed, and `step` runs one step.

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

# Python packages the GPU image lacks travel as wheels in .whl/ (sparsec needs tomli-w):
# install them into a private directory first.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/sparsec_site .whl/*.whl || { echo "$TOOL: installing .whl/ failed"; exit 2; }
  export PYTHONPATH="/tmp/sparsec_site:$PYTHONPATH"
fi
