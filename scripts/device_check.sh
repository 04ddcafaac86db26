#!/usr/bin/env bash
# The prepared GPU check, at most 8 minutes: the tests marked `cuda`, then model_bench.py --llama3-8b,
# kernel_bench.py and conversion_bench.py, every result in one folder: $OUT if set, else
# benchmarks/results/device_check_<UTC time>. Without a CUDA device it says so and exits 0.
#
#   scripts/device_check.sh                 # PYTHON=... picks the interpreter (default: .venv/bin/python, else python3)
#
# Each step has its own time limit (the four add up to 7.5 minutes) and the later steps run even if
# an earlier one fails. summary.txt lists each step's exit status (124: it hit its limit); the script
# exits non-zero if any step failed. The numbers belong in docs/scale.md, with the GPU named.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check: no CUDA device here, nothing to check (run it on a GPU machine)"
  exit 0
fi

DIR="${OUT:-benchmarks/results/device_check_$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
echo "device_check: results in $DIR"
{
  date -u
  nvidia-smi || true
  "$PYTHON" -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
} > "$DIR/environment.txt" 2>&1

failed=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output in NAME.log, its status in summary.txt
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "device_check: $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - start))s" | tee -a "$DIR/summary.txt"
  [ "$status" -eq 0 ] || failed=1
}

step cuda_tests 90 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests --junitxml="$DIR/cuda_tests.xml"
# Two methods, not four: every method's 8B model lives in the timing process at once, and full fine-tuning
# with AdamW does not fit next to them on one 80 GB GPU.
step model_bench 210 "$PYTHON" benchmarks/model_bench.py --llama3-8b --methods fura,lora32 --reps 3 \
  --json "$DIR/model_bench.json"
step kernel_bench 60 "$PYTHON" benchmarks/kernel_bench.py --json "$DIR/kernel_bench.json"
step conversion_bench 90 "$PYTHON" benchmarks/conversion_bench.py --json "$DIR/conversion_bench.json"
echo "device_check: done, see $DIR/summary.txt"
exit "$failed"
