#!/usr/bin/env bash
# One GPU command does it all (../shared/GPU.md), in at most ~9 minutes. Run from the repository root (or from any
# folder: the phases run from the root; a relative OUT or PYTHON is taken from where it was started):
#
#     bash benchmarks/gpu_suite.sh          # results in $OUT (empty or new), else ./bench_out/gpu_suite-<UTC time>
#     GIT_COMMIT=<sha> bash benchmarks/gpu_suite.sh   # where the copy has no .git of its own: the commit the rows name
#
# Phases, in this order, each under its own `timeout` inside one deadline (SUITE_BUDGET_S, default 530 s):
#   1. import the prebuilt deeplab_ops/_C.abi3.so (send it along: GPU.md; with the deeplab_ops/_build_info.json its
#      build wrote, or with none: an import refuses a _C whose record names another torch); rebuild in place only
#      when the import fails (or, with DEEPLAB_OPS_CUDA=1, the library has no CUDA kernels); print `python -m
#      deeplab_ops`;
#   2. correctness: `pytest -m gpu -n 8 -rA` (the whole suite when nothing is marked gpu), then the rest of the
#      suite with what time the goal benchmarks leave (GOAL_RESERVE_S: by default the rest runs only when the gpu
#      phase ended within ~95 s; GOAL_RESERVE_S=0 in a second call runs it in full). Every test's line goes to $OUT
#      as it runs, so the names of failing tests survive a timeout. The gpu phase leaves out test_fuzz.py's slow
#      triton tests (-k "not (fuzz and slow)"): FUZZ_EXAMPLES=300 random geometries each, ~1500 distinct Triton
#      kernel variants to compile in four tests (counted with the interpreter's dry launches), minutes per test on
#      a GPU; the gpu
#      phase without them is ~1450 tests, estimated at 2-3 minutes with 8 workers (PYTEST_GPU_S, default 180);
#   3. the benchmarks, goal reports first, each with --budget-s a little below its timeout, then goals.txt, then
#      the first use of a DeepLabV3-R50 training step on triton (first_use.md: specializations, the goal's verdict,
#      first-step time);
#   4. pack: $OUT keeps at most 8 files (logs, goal JSONs, goals.txt, one tar.gz of everything else).
#
# A phase that fails (FAILED) or hits its timeout (TIMEOUT: its rows so far are kept) is logged and the suite goes
# on; one for which too little time is left is reported as SKIPPED. Ctrl-C (or TERM) hands SIGINT to the running
# phase (INTERRUPTED: its rows so far are kept), skips the rest, packs $OUT as usual and exits with status 130.
# Exit status: 0 when no phase failed and one ran at least, else 1; 2 before anything runs when no GPU is visible
# (`nvidia-smi -L` fails, or torch.cuda.is_available() is False) and BENCH_DEVICE is not cpu, when BENCH_DEVICE is neither cuda nor cpu, or when a number
# knob is not a whole number.
# Knobs: OUT, PYTHON, SUITE_BUDGET_S, GOAL_RESERVE_S (default 360; 0 runs the whole test suite before any
# benchmark), PYTEST_GPU_S (the gpu phase's cap, default 180), BENCH_DEVICE (cuda, the default; cpu: a smoke
# run where there is no GPU: the benchmarks with
# --device cpu --quick and the cpu backend where a GPU run has cuda (cpu, cpu-cl, cpu-lean: goals.txt then compares
# a fused provider), the first use with the interpreter's dry launches in fp16 (bf16's stand-in there: the goal's
# verdict, predicted), and DEEPLAB_OPS_CUDA defaults to 0 so the
# library is not rebuilt for CUDA kernels; its pytest phases run PYTEST_PATHS, by default tests/test_budgets.py and
# tests/test_suite_setup.py, without workers; train_more leaves out compile), PYTEST_WORKERS (8), PYTEST_PATHS
# (the tests: default tests), BENCH_MARGIN_S (each benchmark's --budget-s below its timeout, default 30),
# SUITE_PHASES (a comma-separated selection of the phases below: import and info always run, the others only when
# named, e.g. SUITE_PHASES=conv_bn_relu,first_use in a second call for what a first one had no time for).
#
# What comes back in $OUT (the device tool returns at most 8 files):
#   suite.log                  everything printed, with a summary of the phases at the end
#   pytest_gpu.log             `pytest -m gpu` (-v lines as it goes, -rA summary at the end)
#   pytest_rest.log            the rest of the suite (-m "not gpu and not slow"), as far as time allowed
#   aspp_goal.json, train_bench.json     the rows the issue's goals are read from
#   goals.txt                  the goals, measured (`python benchmarks/common.py goals DIR`)
#   gpu_suite_results.tar.gz   every JSON, CSV, PNG, profile and log of the run, and the kept tuning winners with
#                              every candidate's time (tuning/, first_use_tuning.*/)
set -u

# No GPU: stop here, before anything is built or run, unless a CPU smoke run is asked for.
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
if [ "$BENCH_DEVICE" != cuda ] && [ "$BENCH_DEVICE" != cpu ]; then
    echo "gpu_suite: BENCH_DEVICE=$BENCH_DEVICE: expected cuda (the default) or cpu" >&2
    exit 2
fi
if [ "$BENCH_DEVICE" = cuda ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_suite: no GPU visible (nvidia-smi failed); BENCH_DEVICE=cpu for a CPU smoke run" >&2
    exit 2
fi

# the number knobs: whole numbers (seconds; PYTEST_WORKERS a count), checked before anything runs
for knob in SUITE_BUDGET_S GOAL_RESERVE_S PYTEST_GPU_S PYTEST_WORKERS BENCH_MARGIN_S; do
    value=${!knob:-}
    if [ -n "$value" ] && ! [[ $value =~ ^[0-9]+$ ]]; then
        what="a whole number of seconds"
        if [ "$knob" = PYTEST_WORKERS ]; then what="a whole number of pytest workers (0: none)"; fi
        echo "gpu_suite: $knob=$value: expected $what" >&2
        exit 2
    fi
done

# SUITE_PHASES: names the phases below define, nothing else (a typo would run nothing and say ok)
ALL_PHASES=" pytest_gpu pytest_all pytest_rest aspp_goal train_goal goals first_use train_more conv_bn_relu aspp_sweep \
aspp_dtypes "
if [ -n "${SUITE_PHASES:-}" ]; then
    for name in ${SUITE_PHASES//,/ }; do
        if [[ $ALL_PHASES != *" $name "* ]]; then
            echo "gpu_suite: SUITE_PHASES=$SUITE_PHASES: no phase '$name'; expected names from:$ALL_PHASES" >&2
            exit 2
        fi
    done
fi

PY=${PYTHON:-$(command -v python3 || command -v python)}
case "$PY" in /* | "") ;; */*) PY="$PWD/$PY" ;; esac  # a relative PYTHON names a file from where the suite started
# A GPU that torch cannot use (CUDA_VISIBLE_DEVICES="", a CPU-only torch, a driver older than torch's CUDA) is none:
# the import phase took the CPU-only library for one missing its CUDA kernels and spent minutes rebuilding it.
# (under a time limit: a driver that hangs at CUDA's initialisation must not hang the suite before its budget starts)
if [ "$BENCH_DEVICE" = cuda ] && ! (cd "$(dirname "${BASH_SOURCE[0]}")/.." && timeout 120 "$PY" -c \
        "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)") >/dev/null 2>&1; then
    echo "gpu_suite: nvidia-smi lists a GPU but torch (${PY:-no python3 on PATH}) sees none: torch.cuda.is_available()" \
         "is False (CUDA_VISIBLE_DEVICES, a CPU-only torch, a driver older than torch's CUDA), torch does not" \
         "import, or it did not answer within 120 s; BENCH_DEVICE=cpu for a CPU smoke run" >&2
    exit 2
fi

START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-530}
# what the rest of the test suite leaves for the goal benchmarks and goals.txt (0: the tests first, in full)
GOAL_RESERVE=${GOAL_RESERVE_S:-360}
PACK_S=15                           # kept back for packing
# $OUT gets fixed file names (suite.log, aspp_goal.json, ...): a folder that holds files already (an earlier run's)
# is refused rather than overwritten; unset, each run gets a folder of its own under ./bench_out
if [ -z "${OUT:-}" ]; then
    OUT=./bench_out/gpu_suite-$(date -u +%Y%m%d-%H%M%S)
    if [ -e "$OUT" ]; then OUT="$OUT-$$"; fi  # two runs started within a second
fi
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "gpu_suite: OUT=$OUT already holds files (an earlier run's results?), which this run would replace;" \
         "give an empty or new folder, or leave OUT unset (./bench_out/gpu_suite-<UTC time>)" >&2
    exit 2
fi
if ! mkdir -p "$OUT" 2>/dev/null || ! OUT=$(cd "$OUT" && pwd); then  # a file, or a folder that cannot be made
    echo "gpu_suite: OUT=$OUT cannot be created or entered; give a folder (empty or new)" >&2
    exit 2
fi
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
# Every phase runs from the repository root (benchmarks/..., tests, setup.py are paths from it), wherever the suite
# was started: OUT and PYTHON, given relative to that folder, are resolved above.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || { echo "gpu_suite: cannot enter the repository root $ROOT" >&2; exit 2; }
WORKERS=${PYTEST_WORKERS:-8}
# the tests the pytest phases run: the suite on a GPU machine; on the cpu smoke run (which checks the suite's own
# plumbing: the interpreter's triton tests take ~40 minutes on 2 cores) two files with gpu-marked and other tests
if [ "$BENCH_DEVICE" = cpu ]; then
    TESTS=${PYTEST_PATHS:-tests/test_budgets.py tests/test_suite_setup.py}
    WORKERS=${PYTEST_WORKERS:-0}
else
    TESTS=${PYTEST_PATHS:-tests}
fi
# train_more's providers: compiling the whole R50 takes minutes per case on a CPU (its smoke run leaves it out)
TRAIN_MORE_PROVIDERS=eager,triton,compile
if [ "$BENCH_DEVICE" = cpu ]; then TRAIN_MORE_PROVIDERS=eager,triton; fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the tree's deeplab_ops and model/, no pip install
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
# a library without the CUDA kernels is rebuilt here (not on the cpu smoke run, where none can be built)
if [ "$BENCH_DEVICE" = cpu ]; then export DEEPLAB_OPS_CUDA=${DEEPLAB_OPS_CUDA:-0}; fi
export DEEPLAB_OPS_CUDA=${DEEPLAB_OPS_CUDA:-1}
# Tuned Triton winners, each with every candidate's time, are kept under the stage and packed with the results (the
# data a shorter candidate list is chosen from), unless DEEPLAB_OPS_TUNING_CACHE names another folder; pytest runs
# with them off (tests/conftest.py).
export DEEPLAB_OPS_TUNING_CACHE=${DEEPLAB_OPS_TUNING_CACHE:-$STAGE/tuning}
# $GIT_COMMIT wins; else the commit of this project's own repository, or "unknown" when the copy has no .git or
# sits inside another repository (benchmarks/common.py git_commit: one rule for the suite and the rows).
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT=$("$PY" benchmarks/common.py commit 2>/dev/null | tail -n 1)
    GIT_COMMIT=${GIT_COMMIT:-unknown}
fi
export GIT_COMMIT

FAILED=()
SKIPPED=()
SUMMARY=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# phase NAME CAP_SECONDS 'COMMAND' [RESERVE_SECONDS [MIN_SECONDS]]: run COMMAND in bash under
# `timeout min(CAP, time left - PACK_S - RESERVE)`, SIGINT first (pytest then prints its summary), SIGKILL 15 s on;
# SKIPPED when that is under MIN (default 20 s). The benchmarks read $STEP_S (their timeout) to set --budget-s.
phase() {
    local name=$1 cap=$2 cmd=$3 reserve=${4:-0} min=${5:-20}
    if [ -n "${SUITE_PHASES:-}" ] && [[ $ALL_PHASES == *" $name "* ]] && [[ ",$SUITE_PHASES," != *",$name,"* ]]; then
        SUMMARY+=("-        $name (not in SUITE_PHASES)")
        return 0
    fi
    if [ -n "$INTERRUPTED" ]; then
        echo "=== $name: SKIPPED (interrupted)"
        SKIPPED+=("$name")
        SUMMARY+=("SKIPPED  $name (interrupted)")
        return 0
    fi
    local avail=$(( $(left) - PACK_S - reserve ))
    local limit=$(( cap < avail ? cap : avail ))
    if [ "$cap" -lt "$min" ]; then
        echo "=== $name: SKIPPED (its cap, ${cap}s, is under the ${min}s a phase needs)"
        SKIPPED+=("$name")
        SUMMARY+=("SKIPPED  $name (cap ${cap}s)")
        return 0
    fi
    if [ "$limit" -lt "$min" ]; then
        echo "=== $name: SKIPPED (${avail}s available of the suite's ${BUDGET}s)"
        SKIPPED+=("$name")
        SUMMARY+=("SKIPPED  $name (no time left)")
        return 0
    fi
    export STEP_S=$limit
    echo "=== $name (limit ${limit}s, $(left)s left) $(date -u +%H:%M:%S)"
    local t0 rc took
    t0=$(date +%s)
    # in the background, waited for: a Ctrl-C (or TERM) runs on_interrupt at once, which hands it on to the phase
    # (timeout runs it in a process group of its own, which a terminal's Ctrl-C does not reach)
    timeout --signal=INT --kill-after=15 "$limit" bash -c "$cmd" &
    PHASE_PID=$!
    wait "$PHASE_PID"
    rc=$?
    while kill -0 "$PHASE_PID" 2>/dev/null; do  # interrupted: wait for the phase to write its rows and end
        wait "$PHASE_PID"
        rc=$?
    done
    PHASE_PID=
    if [ -n "$INTERRUPTED" ]; then
        echo "=== $name: interrupted (what it wrote so far is kept)"
        FAILED+=("$name")
        SUMMARY+=("INTERRUPTED $name (rc $rc, $(( $(date +%s) - t0 ))s)")
        return 130
    fi
    took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok       $name (${took}s)")
    elif [ $rc -eq 5 ] && [[ $name == pytest* ]]; then  # pytest: no test selected
        SUMMARY+=("ok       $name (no test selected, ${took}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "=== $name: stopped by its ${limit}s timeout (what it wrote so far is kept)"
        FAILED+=("$name")
        SUMMARY+=("TIMEOUT  $name (rc $rc, ${took}s)")
    else
        FAILED+=("$name")
        SUMMARY+=("FAILED   $name (rc $rc, ${took}s)")
    fi
    echo "=== $name: rc $rc in ${took}s"
    return $rc
}

# bench SCRIPT NAME ARGS...: a benchmark writing under $STAGE (its rows after each case), starting no case once
# its --budget-s is spent: BENCH_MARGIN_S (default 30) below its timeout, more where one case can take long
# (a compile-max case set up in 48 s on the H200).
# cpu_list LIST provider|dtype: a GPU phase's comma-separated providers or dtypes as the cpu smoke run has them:
# cuda, cuda-cl and cuda-lean become the cpu backend's (whole names only), the CUDA-graph replays (cuda-graph,
# triton-graph) and TF32 (a GPU's tensor cores) are left out.
cpu_list() {
    local item out=()
    local IFS=,
    for item in $1; do
        if [ "$2" = provider ]; then
            case $item in
                *-graph) continue ;;
                cuda|cuda-*) item=cpu${item#cuda} ;;
            esac
        elif [ "$item" = tf32 ]; then
            continue
        fi
        out+=("$item")
    done
    echo "${out[*]}"
}

bench() {
    local script=$1 name=$2
    shift 2
    local margin=${BENCH_MARGIN_S:-30}
    local budget=$(( STEP_S - margin > 5 ? STEP_S - margin : 5 ))
    local extra=() args=() a prev=
    [ "$BENCH_DEVICE" = cpu ] && extra=(--quick --threads 1)
    for a in "$@"; do  # the cpu smoke run times the cpu backend where a GPU run times cuda (goals.txt compares it)
        if [ "$BENCH_DEVICE" = cpu ] && [ "$prev" = --providers ]; then a=$(cpu_list "$a" provider); fi
        if [ "$BENCH_DEVICE" = cpu ] && [ "$prev" = --dtypes ]; then a=$(cpu_list "$a" dtype); fi
        args+=("$a")
        prev=$a
    done
    # NAME.png where matplotlib is installed (it is not a dependency of the package)
    if "$PY" -c "import matplotlib" 2>/dev/null; then extra+=(--plot); fi
    "$PY" "benchmarks/$script" --device "$BENCH_DEVICE" "${extra[@]}" --out "$STAGE" --name "$name" \
        --budget-s "$budget" "${args[@]}"
}

# first_use: the first DeepLabV3-R50 training step on triton (overhead_bench.py --r50-step): the Triton
# specializations it compiles (JIT cache entries) and its time, rows written after each step; the goal (<= 40) is
# the full-width step's in bf16, the GPU run's default, and first_use.md gives its verdict. On the cpu smoke run:
# the interpreter with dry launches (the count predicted in seconds), in fp16, which stands in for bf16 there (the
# interpreter runs no bf16 on CPU tensors; at its default, fp32, the rows would say they are not the goal's).
first_use() {
    local margin=${BENCH_MARGIN_S:-30}
    local budget=$(( STEP_S - margin > 5 ? STEP_S - margin : 5 ))
    if [ "$BENCH_DEVICE" = cpu ]; then
        TRITON_INTERPRET=1 "$PY" benchmarks/overhead_bench.py --device cpu --r50-step --dry-launches --step-dtype fp16 \
            --threads 1 --out "$STAGE" --name first_use --budget-s "$budget"
    else
        # an empty folder of kept tuning winners: the earlier phases' winners would spare this step its timing (its
        # note says what Triton's kernel cache held: those kernels load instead of compiling); packed with the rest
        DEEPLAB_OPS_TUNING_CACHE="$(mktemp -d "$STAGE/first_use_tuning.XXXX")" "$PY" benchmarks/overhead_bench.py \
            --device cuda --r50-step --out "$STAGE" --name first_use --budget-s "$budget"
    fi
}

# log_to FILE: stdin to stdout and FILE (tee), deaf to SIGINT and SIGTERM: a TERM sent to the suite's whole process
# group (`timeout`, `docker stop`, a scheduler) or the SIGINT of a phase's timeout must not end the log before what
# follows it (pytest's summary, the suite's packing, which a dead tee's broken pipe ended at once). (An ignored
# signal stays ignored across exec.)
log_to() {
    trap '' INT TERM
    exec tee "$1"
}

# pytest_run LOG ARGS...: pytest with a line per test (-v) and every outcome at the end (-rA), written to
# $OUT/LOG as it runs (log_to: the SIGINT of the timeout must not stop the log before pytest's summary).
pytest_run() {
    local log=$1
    shift
    local par=()
    if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then par=(-n "$WORKERS"); fi
    local to=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then to=(--timeout=240); fi
    set -o pipefail
    # shellcheck disable=SC2086  # TESTS: paths separated by spaces
    "$PY" -m pytest -p no:cacheprovider "${par[@]}" "${to[@]}" -v -rA "$@" $TESTS 2>&1 | log_to "$OUT/$log"
}

import_ok() {
    "$PY" -c "
import os, sys
import deeplab_ops
from deeplab_ops import _extension
_extension.load()
if os.environ.get('DEEPLAB_OPS_CUDA') == '1' and not _extension.cuda_kernels_compiled():
    sys.exit('deeplab_ops._C has no CUDA kernels (DEEPLAB_OPS_CUDA=1)')
print('deeplab_ops._C imported from', os.path.dirname(deeplab_ops.__file__))
"
}

prepare() {  # import the prebuilt library; build in place only if that fails
    if import_ok; then return 0; fi
    echo "the prebuilt library does not import: building in place (minutes)"
    "$PY" setup.py build_ext --inplace && import_ok
}

export -f bench cpu_list first_use log_to pytest_run import_ok prepare
export PY STAGE OUT BENCH_DEVICE WORKERS TESTS TRAIN_MORE_PROVIDERS

# Ctrl-C or TERM: the running phase gets SIGINT (the benchmarks keep their finished rows, pytest prints its
# summary), the phases left are SKIPPED, and what the run wrote is packed into $OUT as usual; exit status 130.
INTERRUPTED=
PHASE_PID=
on_interrupt() {
    INTERRUPTED=1
    if [ -n "$PHASE_PID" ]; then kill -INT -- "-$PHASE_PID" 2>/dev/null || kill -INT "$PHASE_PID" 2>/dev/null; fi
}

main() {
trap on_interrupt INT TERM
echo "gpu_suite: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $GIT_COMMIT, python $PY, stage $STAGE, out $OUT," \
     "budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)" \
    || echo "torch/triton import failed"

# 1. the library, and what it offers
phase import 300 prepare
phase info 60 '"$PY" -m deeplab_ops'

# 2. correctness first: the gpu-marked tests, then the rest of the suite with what the goal benchmarks leave
phase pytest_gpu "${PYTEST_GPU_S:-180}" 'pytest_run pytest_gpu.log -k "not (fuzz and slow)" -m gpu'
rc=$?
# pytest: no test collected (exit 5), nothing is marked gpu: the whole suite instead; so too where SUITE_PHASES names
# pytest_all
if [ $rc -eq 5 ] || [[ ",${SUITE_PHASES:-}," == *",pytest_all,"* ]]; then
    [ $rc -eq 5 ] && echo "=== no test is marked gpu: running the whole suite"
    phase pytest_all 200 'pytest_run pytest_rest.log' "$GOAL_RESERVE" 60
else
    phase pytest_rest 150 'pytest_run pytest_rest.log -m "not gpu and not slow"' "$GOAL_RESERVE" 60
fi

# 3. benchmarks, goals first (the issue's goals: bf16, output stride 16, batch 16). Modes in goal order; aspp_bench
#    runs compile-max's rows after every other provider's (its setup took 47-71 s per mode on the H200, and it spent
#    the phase's budget before any fwd_bwd row ran).
#    The eager setups users run (channels_last, autocast) come with eager NCHW: the goals read the fastest of them.
#    cuda-graph and triton-graph (after compile, whose rows the goals read): the fused cases replayed from a CUDA
#    graph, their kernels without host work (with --profile's host tables: how much of a fused row is host time).
phase aspp_goal 190 'BENCH_MARGIN_S=50 bench aspp_bench.py aspp_goal --configs os16 --batches 16 --dtypes bf16 \
    --profile --providers eager,eager-cl,eager-amp,eager-cl-amp,cuda,triton,compile,cuda-graph,triton-graph,compile-max \
    --modes train_fwd,eval_fwd,fwd_bwd' 0 60
# (20 s kept back for the goals phase that follows). triton-lean last: its first step compiles and autotunes the
# network's Triton kernels, and on the H200 it spent the phase's time before cuda ran.
phase train_goal 150 'bench train_bench.py train_bench --models r50 --output-strides 16 --batches 16 \
    --dtypes bf16 --providers eager,eager-cl,eager-amp,cuda-lean,cuda,triton-lean' 20 60
phase goals 20 'set -o pipefail; "$PY" benchmarks/common.py goals "$STAGE" | log_to "$STAGE/goals.txt"'
phase first_use 120 'BENCH_MARGIN_S=60 first_use' 0 45
phase train_more 90 'BENCH_MARGIN_S=45 bench train_bench.py train_bench_more --models r50,r101 --output-strides 16 \
    --batches 16 --dtypes bf16 --providers $TRAIN_MORE_PROVIDERS --modes train_step' 0 60
phase conv_bn_relu 60 'bench conv_bn_relu_bench.py conv_bn_relu_bench --dtypes bf16 --batches 16 \
    --providers eager,eager-cl,cuda,triton,cuda-cl,triton-cl' 0 45
phase aspp_sweep 60 'bench aspp_bench.py aspp_sweep --dtypes bf16 --providers eager,cuda,triton' 0 45
phase aspp_dtypes 45 'bench aspp_bench.py aspp_dtypes --configs os16 --batches 16 --dtypes fp16,fp32,tf32 \
    --providers eager,cuda,triton' 0 45

# 4. pack: at most 8 files in $OUT (suite.log and the pytest logs are written there directly)
echo "=== summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
printf '  %s\n' "${SUMMARY[@]}"
for f in aspp_goal.json train_bench.json goals.txt; do
    if [ -f "$STAGE/$f" ]; then cp "$STAGE/$f" "$OUT/"; fi
done
for f in pytest_gpu.log pytest_rest.log; do
    if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$STAGE/"; fi
done
tar -czf "$OUT/gpu_suite_results.tar.gz" -C "$STAGE" . || echo "tar failed"
echo "results in $OUT ($(find "$OUT" -maxdepth 1 -type f | wc -l) files; suite.log follows): $(cd "$OUT" && ls | tr '\n' ' ')"
if [ ${#SKIPPED[@]} -gt 0 ]; then
    echo "phases skipped ${INTERRUPTED:+(interrupted, or }for lack of time${INTERRUPTED:+)}: ${SKIPPED[*]}"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED phases: ${FAILED[*]}"
fi
if [ -n "$INTERRUPTED" ]; then
    echo "gpu_suite: interrupted; the results so far are in $OUT"
    return 130
fi
if ! printf '%s\n' "${SUMMARY[@]}" | grep -q '^ok '; then
    echo "gpu_suite: no phase ran (SUITE_BUDGET_S=${BUDGET} left no time for any): nothing was measured"
    return 1
fi
[ ${#FAILED[@]} -eq 0 ]
}

# main runs in this shell (not in a pipeline's subshell, which a TERM sent to the suite's PID did not reach: the
# phases ran on and the suite exited 0), its output through log_to (suite.log keeps what is printed after a Ctrl-C
# or a TERM to the whole process group, which ended tee and then the suite, unpacked, at its next line).
main > >(log_to "$OUT/suite.log") 2>&1
rc=$?
wait "$!" 2>/dev/null  # tee: suite.log complete before the suite ends
rm -rf "$STAGE"
exit "$rc"
