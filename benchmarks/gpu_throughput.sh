#!/usr/bin/env bash
# GPU throughput of SimCLIC in one command (about 8 minutes at most, install
# included): installs the package with its GPU extra, then runs
# benchmarks/throughput.py (SimSiam `none` against `history`, for float32,
# mixed_bfloat16 and mixed_float16, XLA on and off, on synthetic data and on
# ../shared/data/cifar10_train_10k.npz) and prints the images/second table.
#
#   bash benchmarks/gpu_throughput.sh                    # from anywhere
#   SKIP_INSTALL=1 bash benchmarks/gpu_throughput.sh --steps 2 --warmup-steps 1 \
#       --width 4 --batch-size 32                        # CPU smoke test
#
# Arguments pass through to throughput.py (a repeated flag overrides the
# defaults here; set OUT rather than --out, so that log.txt lands beside
# the CSV). Environment: SKIP_INSTALL=1 skips pip; TOTAL_S (default
# 470) bounds the whole script, install included; results (throughput.csv,
# throughput.txt, log.txt) go to $OUT when it is set, else
# runs/gpu_throughput. throughput.py skips (precision, jit) pairs that would
# not finish in the time left, and lists them with the flags that run them.
set -euo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=${TOTAL_S:-470}
OUT_DIR=${OUT:-runs/gpu_throughput}
mkdir -p "$OUT_DIR"
start=$SECONDS

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    echo "== pip install -e .[gpu]"
    timeout --kill-after=10 $((TOTAL_S / 2)) python -m pip install -q -e ".[gpu]"
fi

command -v nvidia-smi >/dev/null \
    && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

left=$((TOTAL_S - (SECONDS - start)))
if [ "$left" -lt 90 ]; then
    echo "only ${left} s of TOTAL_S=${TOTAL_S} left after the install; not starting" >&2
    exit 1
fi
echo "== benchmarks/throughput.py (${left} s left)"
# The pairs are planned to end 30 s before the hard stop.
timeout --kill-after=15 "$left" python benchmarks/throughput.py \
    --out "$OUT_DIR" --budget-s $((left - 30)) "$@" 2>&1 | tee "$OUT_DIR/log.txt"
