#!/usr/bin/env bash
# One GPU lease, one call, from the repository root:  bash bench/gpu_run.sh
# Builds the CUDA extension, runs every test (CUDA ones included), compute-sanitizer memcheck over
# the CUDA tests, then both benchmarks. Each stage has a time budget and a failing stage does not
# stop the next; a summary of exit statuses comes last. Everything lands in $OUT (at most 8 files):
#   gpu_run.log   every stage's output      junit.xml   the test suite's results
#   bench/        results.json results.md speedup.png (python -m vkernels.bench)
#   max-autotune/ results.json results.md (conv forward cases with torch.compile max-autotune too)
#   bench.json    pytest-benchmark's results with extra_info (GB/s, device times)
# Before the call, run bench/gpu_wheels.sh here and carry .whl: the tests then run on 8 processes.
set -o pipefail
OUT=${OUT:-bench-results/gpu-run}  # $OUT is set on a lease; bench-results/ is git-ignored
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME; fi
fi

START=$SECONDS
SUMMARY=()
# run_stage NAME DEADLINE COMMAND...: DEADLINE is seconds since the start by which the stage must
# end, so time an early stage leaves unused passes on to the later ones (under the 10 minutes a lease allows one call).
run_stage() {
    local name=$1 deadline=$2; shift 2
    local budget=$((deadline - (SECONDS - START))) began=$SECONDS status
    if [ "$budget" -lt 10 ]; then
        SUMMARY+=("$(printf '%-16s skipped: out of time' "$name")"); return
    fi
    echo "=== $name (budget ${budget}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG"
    status=$?
    [ "$status" -eq 124 ] && echo "=== $name: TIMED OUT after ${budget}s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-16s exit %-4s %4ss' "$name" "$status" "$((SECONDS - began))")")
}

run_stage info 20 bash -c "nvidia-smi; $PYTHON -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'; nvcc --version | tail -2; echo CUDA_HOME=\$CUDA_HOME"

# No internet there and torch is preinstalled: no build isolation, no dependencies, no index.
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
run_stage build 150 bash -c "$PYTHON -m pip install --no-build-isolation --no-deps --no-index -e . \
    || { echo 'pip install -e failed; building in place instead'; $PYTHON setup.py build_ext --inplace; }"
run_stage import 160 $PYTHON -c "import vkernels; print({name: tuple(s) for name, s in vkernels.backends().items()})"

# Wheels carried in .whl (bench/gpu_wheels.sh): pytest-xdist, so that Triton's compiles of each new
# kernel shape, which dominate the suite's time there, run on 8 cores.
if ls .whl/*.whl >/dev/null 2>&1 && $PYTHON -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
XDIST=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 8")
run_stage tests 330 $PYTHON -m pytest tests $XDIST --maxfail=25 -q -rs --junitxml="$OUT/junit.xml"
# Without the caching allocator every tensor is its own allocation, so memcheck sees overruns
# that would otherwise land inside a cached block.
run_stage memcheck 390 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 1 $PYTHON -m pytest tests -m cuda -x -q -rs -p no:cacheprovider
run_stage bench 480 $PYTHON -m vkernels.bench --out "$OUT/bench"
# Conv forward against torch.compile max-autotune (the issue's bar), apart: it autotunes for minutes.
run_stage max-autotune 540 $PYTHON -m vkernels.bench --only '^conv2d_relu .* fwd$' --max-autotune \
    --out "$OUT/max-autotune"
rm -f "$OUT/max-autotune/speedup.png"  # at most 8 files come back from a lease
run_stage pytest-bench 580 $PYTHON -m pytest bench/ --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,iqr,rounds

# The call's reply carries only the end of the output: the main table, then the summary.
[ -f "$OUT/bench/results.md" ] && cat "$OUT/bench/results.md"
{
    echo "=== summary (total $((SECONDS - START))s; files in $OUT)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
