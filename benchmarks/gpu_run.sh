#!/usr/bin/env bash
# Everything this repository measures on a GPU, in one call (a lent GPU machine is held by the minute):
#   1. the Triton kernel tests compiled for the GPU (NANOQ_TRITON_DEVICE=cuda) instead of interpreted;
#   2. the transformers end-to-end benchmark (Llama-3-8B shapes): bf16 / w8 / w4g128 / cb4g128;
#   3. the kernel benchmark against cuBLAS bf16 (benchmarks/kernels.py);
#   4. the grouped MoE kernel (kernels/triton_moe) against a bf16 per-expert loop, Qwen3-30B-A3B and Mixtral
#      expert shapes, checked against that loop's output (benchmarks/moe_kernels.py -> moe-kernels.json).
# Each step has its own time limit and writes its log and JSON under $OUT as it goes, so a step that fails or
# runs long costs only itself. The limits add up to ~7.7 min: a 15-minute lease holds one full run and a rerun
# of the steps that failed, not two full runs. No install: the GPU image's torch / triton / transformers are used
# as they are, and the repository is put on PYTHONPATH.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh
#   OUT=/tmp/gpu SMOKE=1 bash benchmarks/gpu_run.sh     # the same flow on the CPU: tiny sizes, no GPU needed
set -u
OUT=${OUT:-/tmp/nanoq-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

if [ -n "${SMOKE:-}" ]; then
    DEVICE=cpu; TEST_DEVICE=cpu; E2E_ARGS="--tiny --device cpu --batches 1 4 --new-tokens 8"; KERNEL_ARGS="--device cpu --quick"
    MOE_ENV="TRITON_INTERPRET=1"; MOE_ARGS="--device cpu --quick"  # the Triton kernel on the CPU: interpreted
else
    DEVICE=cuda; TEST_DEVICE=cuda; E2E_ARGS="--batches 1 16 --new-tokens 32"; KERNEL_ARGS="--device cuda --schemes int8 int4g128 int3g128 cb4g128 --m 1 16 64 256 2048 --shapes 4096x14336 14336x4096 8192x8192"
    MOE_ENV=""; MOE_ARGS="--device cuda --schemes int4g128 int8 --tokens 1 16 256 2048"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 25 "$OUT/$name.log"
}

{
    date -u
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
    fi
    $PY -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
step triton-tests 50 env NANOQ_TRITON_DEVICE=$TEST_DEVICE $PY -m pytest -q -p no:cacheprovider $XDIST -k "bf16 or gather" \
    tests/kernels/test_triton_gemm.py tests/kernels/test_triton_embedding.py
step e2e 200 $PY benchmarks/generate_e2e.py $E2E_ARGS --out "$OUT/e2e.json"
step kernels 150 $PY benchmarks/kernels.py $KERNEL_ARGS --out "$OUT/kernels.json"
step moe-kernels 60 env $MOE_ENV $PY benchmarks/moe_kernels.py $MOE_ARGS --out "$OUT/moe-kernels.json"
