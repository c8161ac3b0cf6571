#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py has the steps, budgets and targets; docs/guides/gpu.md).
#
#   bash benchmarks/gpu_check.sh               # on a lent H100/H200, from anywhere: at most 9 minutes
#   bash benchmarks/gpu_check.sh --cpu-quick   # tiny shapes on a CPU (CI), well under a minute
#
# Results go to $OUT (default ./gpu_check_out): gpu_check.json, steps/, logs/. Other arguments are
# passed to gpu_check.py (e.g. --steps decompose,compress, --budget compress=240). The project need
# not be installed: it runs from this checkout through PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/gpu_check_out}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"

mode=(--device cuda)
limit=535   # gpu_check.py's own deadline is 510 s; this only catches a wedged interpreter
args=()
for a in "$@"; do
    case "$a" in
        --cpu-quick) mode=(--quick --device cpu); limit=170 ;;
        *) args+=("$a") ;;
    esac
done

py=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$py" ]; then
    echo "gpu_check: no python on PATH (set PYTHON=...)" >&2
    exit 3
fi
# SIGTERM first (gpu_check.py then kills its step, writes gpu_check.json and prints the table),
# SIGKILL 5 s later: the whole command never runs past 9 minutes.
if command -v timeout >/dev/null; then
    exec timeout --signal=TERM --kill-after=5 "$limit" "$py" benchmarks/gpu_check.py "${mode[@]}" ${args[@]+"${args[@]}"}
fi
exec "$py" benchmarks/gpu_check.py "${mode[@]}" ${args[@]+"${args[@]}"}
