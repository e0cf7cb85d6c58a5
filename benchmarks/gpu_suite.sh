#!/usr/bin/env bash
# One GPU call does it all (../shared/GPU.md): build, `python -m deeplab_ops`, the test suite on the GPU, and every
# benchmark at DeepLab shapes, in under 10 minutes on an H100. Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh                 # results under $OUT, or ./bench_out when OUT is unset
#     GIT_COMMIT=<sha> bash benchmarks/gpu_suite.sh   # where the copy has no .git: the commit the rows name
#
# Steps run in priority order under one deadline (SUITE_BUDGET_S, default 570 s); each step has its own cap and
# `timeout`, so one hang cannot eat the rest. A step that fails is logged and the suite goes on; one for which no
# time is left is reported as SKIPPED. Exit status: 0 when no step failed, else 1.
#
# What comes back in $OUT (the device tool returns at most 8 files, at most 2 folders down):
#   suite.log                  everything printed, with a summary of the steps at the end
#   pytest.log                 the test suite's output
#   aspp_goal.json, train_bench.json     the rows the issue's goals are read from
#   gpu_suite_results.tar.gz   every JSON, CSV, PNG and log of the run, and goals.txt (results/README.md says which)
set -u

START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-570}
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export DEEPLAB_OPS_CUDA=${DEEPLAB_OPS_CUDA:-1}  # a build that skips the CUDA kernels is an error here
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export GIT_COMMIT

FAILED=()
SKIPPED=()
SUMMARY=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME CAP_SECONDS 'COMMAND': run COMMAND in bash under `timeout min(CAP, time left - 15 s for packing)`.
# The benchmark commands read $STEP_S (their timeout) to set --budget-s a little below it.
step() {
    local name=$1 cap=$2 cmd=$3
    local avail=$(( $(left) - 15 ))
    local limit=$(( cap < avail ? cap : avail ))
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: SKIPPED (only ${avail}s of the suite's ${BUDGET}s left)"
        SKIPPED+=("$name")
        SUMMARY+=("SKIPPED  $name (no time left)")
        return 0
    fi
    export STEP_S=$limit
    echo "=== $name (limit ${limit}s, $(left)s left) $(date -u +%H:%M:%S)"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$cmd"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok       $name (${took}s)")
    else
        [ $rc -eq 124 ] && echo "=== $name: timed out after ${limit}s"
        FAILED+=("$name")
        SUMMARY+=("FAILED   $name (rc $rc, ${took}s)")
    fi
    echo "=== $name: rc $rc in ${took}s"
}

bench() {  # bench SCRIPT NAME ARGS...: a benchmark with its results under $STAGE, stopping before its timeout
    local script=$1 name=$2
    shift 2
    local budget=$(( STEP_S - 25 > 5 ? STEP_S - 25 : 5 ))
    "$PY" "benchmarks/$script" --device cuda --out "$STAGE" --name "$name" --plot --budget-s "$budget" "$@"
}

build() {
    "$PY" -m pip install --no-build-isolation --no-deps -e . || {
        echo "pip install failed; trying setup.py build_ext --inplace"
        "$PY" setup.py build_ext --inplace
    }
}
export -f bench build
export PY STAGE

main() {
echo "gpu_suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $GIT_COMMIT, python $PY, stage $STAGE, out $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)" \
    || echo "torch/triton import failed"

# 1. build, and what was built
step build 240 build
step info 60 '"$PY" -m deeplab_ops'

# 2. the test suite on the GPU (CUDA and Triton paths, half types included)
step pytest 170 'set -o pipefail; "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$STAGE/pytest.log"'

# 3. benchmarks, goals first (the issue's goals: H100, bf16, output stride 16, batch 16)
step aspp_goal 150 'bench aspp_bench.py aspp_goal --configs os16 --batches 16 --dtypes bf16 --profile \
    --providers eager,cuda,triton,compile,compile-max --modes train_fwd,fwd_bwd,eval_fwd'
step train_fused 100 'bench train_bench.py train_bench --models r50,r101 --output-strides 16 --batches 16 \
    --dtypes bf16 --providers eager,cuda,triton,triton-lean,cuda-lean'
step train_compile 90 'bench train_bench.py train_bench_compile --models r50 --output-strides 16 --batches 16 \
    --dtypes bf16 --providers eager,compile --modes train_step'
step aspp_sweep 60 'bench aspp_bench.py aspp_sweep --dtypes bf16 --providers eager,cuda,triton'
step aspp_dtypes 45 'bench aspp_bench.py aspp_dtypes --configs os16 --batches 16 --dtypes fp16,fp32,tf32 \
    --providers eager,cuda,triton'
step conv_bn_relu 60 'bench conv_bn_relu_bench.py conv_bn_relu_bench --dtypes bf16 --batches 16 \
    --providers eager,reference,cuda,triton'

step goals 30 '"$PY" benchmarks/common.py goals "$STAGE" | tee "$STAGE/goals.txt"'

# 4. pack what comes back (at most 8 files; suite.log is written to $OUT directly)
echo "=== summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
printf '  %s\n' "${SUMMARY[@]}"
if [ -f "$STAGE/pytest.log" ]; then cp "$STAGE/pytest.log" "$OUT/"; fi
for f in aspp_goal.json train_bench.json; do
    if [ -f "$STAGE/$f" ]; then cp "$STAGE/$f" "$OUT/"; fi
done
tar -czf "$OUT/gpu_suite_results.tar.gz" -C "$STAGE" . || echo "tar failed"
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ ${#SKIPPED[@]} -gt 0 ]; then echo "steps skipped for lack of time: ${SKIPPED[*]}"; fi
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}"
    return 1
fi
return 0
}

main 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
