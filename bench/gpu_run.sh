#!/usr/bin/env bash
# One GPU lease, one call of at most 9 minutes (the build included), from the repository root:
#     bash bench/gpu_run.sh             on the GPU machine (VKERNELS_COMMIT=<sha> names the commit where .git is absent)
#     bash bench/gpu_run.sh --dry-run   anywhere: the same stages' plumbing on CPU at small sizes; verifies nothing
# Each stage has a deadline (seconds since the start: time a stage leaves unused passes to the later
# ones) and writes into $OUT as it goes, so that a call cut short still returns what it did:
#   stage     ends at (budget)
#   info        30 s  (30)  nvidia-smi, versions, kernel source hashes, measured ceilings  -> run.json
#   build      180 s (150)  the CUDA extension (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0a), then import it
#   tests      330 s (150)  the kernel tests first, then the rest; 8 processes, each Triton kernel's
#                           first config only; tests not started 20 s before the end are skipped -> junit.xml
#   headline   425 s  (95)  benchmarks at the anchor shapes of the README's targets, autotune capped
#                           to the first 2 configs per key                               -> results.json
#   memcheck   465 s  (40)  compute-sanitizer memcheck over a small CUDA subset (exit 86: errors found)
#   first-call 505 s  (40)  each op's first call, compile included, with and without shipped configs
#   rest       525 s  (20)  the other benchmark cases, as time allows                    -> results.json
#   verify     540 s  (15)  python -m vkernels.verify $OUT --out $OUT -> verified.json tuned_configs.json benchmarks.md
# Every stage appends its exit status, time and budget to stages.jsonl; gpu_run.log has all output.
# That is 8 files, the most a lease returns. Back on the development machine,
# `python -m vkernels.verify <those files' folder>` writes the same records into vkernels/ and BENCHMARKS.md.
set -o pipefail
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-bench-results/gpu-run}  # $OUT is set on a lease; bench-results/ is git-ignored
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # what is not among the 8 files: results.md, speedup.png, the Triton caches of first-call
LOG="$OUT/gpu_run.log"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME; fi
fi
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # CPU even where a GPU is present
    echo "=== DRY RUN: the stages' plumbing on CPU at small sizes; it verifies nothing" | tee -a "$LOG"
fi

START=$SECONDS
# run_stage NAME DEADLINE COMMAND: runs the bash COMMAND until DEADLINE (seconds since the start)
# and records it; COMMAND reads the stage's end as $STAGE_END (unix time).
run_stage() {
    local name=$1 deadline=$2 command=$3
    local budget=$((deadline - (SECONDS - START))) began=$SECONDS status
    if [ "$budget" -lt 5 ]; then
        printf '{"stage": "%s", "exit": "skipped: out of time", "seconds": 0, "budget": %d}\n' "$name" "$budget" >>"$OUT/stages.jsonl"
        return
    fi
    export STAGE_END=$(( $(date +%s) + budget ))
    echo "=== $name (budget ${budget} s): $command" | tee -a "$LOG"
    timeout --kill-after=5 "$budget" bash -c "$command" 2>&1 | tee -a "$LOG"
    status=$?
    [ "$status" -eq 124 ] && echo "=== $name: TIMED OUT after ${budget} s" | tee -a "$LOG"
    printf '{"stage": "%s", "exit": %d, "seconds": %d, "budget": %d}\n' "$name" "$status" "$((SECONDS - began))" "$budget" >>"$OUT/stages.jsonl"
}
keep_bench_json() { if [ -f "$WORK/bench/results.json" ]; then cp "$WORK/bench/results.json" "$OUT/results.json"; fi; }

run_stage info 30 "{ nvidia-smi || echo 'no nvidia-smi'; } && $PYTHON -m vkernels.bench.machine '$OUT/run.json' --command 'bash bench/gpu_run.sh $*'"

if [ "$DRY_RUN" = 1 ]; then
    run_stage build 180 "echo 'dry run: no build (the info stage imported vkernels)'"
else
    # No internet there and torch is preinstalled: no build isolation, no dependencies, no index. The
    # CPU emulator build (vkernels._C_emu) is for machines without a GPU: skipped, it saves lease time.
    export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} VKERNELS_EMULATION=0
    run_stage build 180 "{ $PYTHON -m pip install --no-build-isolation --no-deps --no-index -e . \
        || { echo 'pip install -e failed; building in place instead'; $PYTHON setup.py build_ext --inplace; }; } \
        && $PYTHON -c 'import vkernels; print(vkernels.backends())'"
fi

# The kernel tests first, then the slow whole-model ones. Each test records the kernels it ran in
# junit.xml (tests/conftest.py); tests not started 20 s before the stage's end are skipped, so that
# pytest still writes its junit XML.
LATER=(tests/test_models.py tests/test_training.py tests/test_patch.py tests/test_compile.py tests/test_nn_attention.py)
TESTS=""
for file in tests/test_*.py; do case " ${LATER[*]} " in *" $file "*) ;; *) TESTS+=" $file" ;; esac; done
for file in "${LATER[@]}"; do if [ -f "$file" ]; then TESTS+=" $file"; fi; done
XDIST=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 8")
if [ "$DRY_RUN" = 1 ]; then TESTS="tests/test_backends.py -k 'not traces'"; XDIST=""; fi
run_stage tests 330 "VKERNELS_TEST_DEADLINE=\$((STAGE_END - 20)) $PYTHON -m pytest $TESTS $XDIST -q -rfE -p no:cacheprovider \
    --maxfail=100 --junitxml='$OUT/junit.xml'"

# Benchmarks: results go to $WORK/bench, and results.json alone to $OUT (8 files at most come back).
# Stock torch.compile is left out: it compiles for tens of seconds per case.
if [ "$DRY_RUN" = 1 ]; then HEADLINE_ONLY="--only 'max_pool2d .* NCHW fwd$|attention'"; REST_ONLY="--only 'avg_pool2d .* NCHW fwd$'"; OPS=1
else HEADLINE_ONLY=""; REST_ONLY=""; OPS=4; fi
run_stage headline 425 "VKERNELS_TRITON_AUTOTUNE_CONFIGS=2 $PYTHON -m vkernels.bench --headline --quick --no-compile \
    $HEADLINE_ONLY --out '$WORK/bench'"
keep_bench_json

# Without the caching allocator every tensor is its own allocation, so memcheck sees overruns
# that would otherwise land inside a cached block.
MEMCHECK_TESTS="tests/test_pooling.py::test_max_pool2d_matches_torch tests/test_conv.py::test_conv2d_relu_matches_torch \
    tests/test_attention.py::test_vit_block_qkv_views"
if command -v compute-sanitizer >/dev/null && [ "$DRY_RUN" = 0 ]; then
    run_stage memcheck 465 "VKERNELS_TEST_DEADLINE=\$((STAGE_END - 10)) PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck --error-exitcode 86 $PYTHON -m pytest $MEMCHECK_TESTS -k cuda -q -rfE \
        -p no:cacheprovider -p no:xdist"
else
    printf '{"stage": "memcheck", "exit": "skipped: no compute-sanitizer", "seconds": 0, "budget": 0}\n' >>"$OUT/stages.jsonl"
fi

if [ -f "$WORK/bench/results.json" ]; then
    run_stage first-call 505 "$PYTHON -m vkernels.bench.first_call '$WORK/bench/results.json' --ops $OPS"
    keep_bench_json
fi
run_stage rest 525 "$PYTHON -m vkernels.bench --merge --quick --no-compile $REST_ONLY --out '$WORK/bench'"
keep_bench_json

run_stage verify 540 "$PYTHON -m vkernels.verify '$OUT' --out '$OUT'"
rm -rf "$WORK"
echo "=== done in $((SECONDS - START)) s; files in $OUT:" | tee -a "$LOG"
ls "$OUT" | tee -a "$LOG"
