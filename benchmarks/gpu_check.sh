#!/usr/bin/env bash
# GPU check, in one call of under 10 minutes on one H100/H200-class GPU:
#   0. the tiles the launchers pick on this GPU, against the ahead-of-time audit's record for its
#      target (benchmarks/aot_audit.json, from `python -m benchmarks.aot_audit`);
#   1. the kernels' correctness tests, compiled (TRITON_INTERPRET=0: no interpreter);
#   2. the full-scale benchmarks (LCL_BENCH_SCALE=full), most important groups first;
#   3. the report: RESULTS.md + contrastive_memory.png from the benchmark JSON.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else benchmarks/gpu_results
#
# OUT_DIR receives env.txt, configs.txt, tests.log, bench.log, bench.json, RESULTS.md, contrastive_memory.png.
# Publish with: cp OUT_DIR/RESULTS.md OUT_DIR/contrastive_memory.png benchmarks/
# Time budgets (seconds) are overridable: LCL_GPU_TEST_BUDGET_S (150), LCL_GPU_BENCH_BUDGET_S (360),
# and LCL_GPU_TESTS (the test paths, default tests/ops). Exit status: the tests' status, else the
# benchmarks', else the report's. LCL_GPU_CHECK_ALLOW_CPU=1 lets it run without CUDA (to try the
# script itself, e.g. with LCL_BENCH_SCALE=smoke); PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/gpu_results}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
TEST_BUDGET=${LCL_GPU_TEST_BUDGET_S:-150}
BENCH_BUDGET=${LCL_GPU_BENCH_BUDGET_S:-360}
TESTS=${LCL_GPU_TESTS:-tests/ops}
export TRITON_INTERPRET=0  # tests that setdefault("TRITON_INTERPRET", "1") keep the compiler
export LCL_BENCH_SCALE=${LCL_BENCH_SCALE:-full}
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi || true
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)"
    $PY -m pip list 2>/dev/null | grep -i -E "flash|xformers|inf.cl|liger|cut.cross|dali" || true
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${LCL_GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
        echo "no CUDA device: nothing to check here (the CPU suite is: pytest benchmarks/ --benchmark-only)"
        exit 2
    fi
    echo "no CUDA device; LCL_GPU_CHECK_ALLOW_CPU=1: dry run of this script on the CPU"
fi
# lcl_fast.kernels is the top-level kernels/ folder mapped into the package: needs the (editable) install.
$PY -c "import lcl_fast.kernels" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "warning: could not install lcl-fast; imports may fail"

# Per-test time limits when pytest-timeout is there (the whole-stage budgets hold regardless).
TEST_LIMIT=""; BENCH_LIMIT=""
if $PY -c "import pytest_timeout" 2>/dev/null; then TEST_LIMIT="--timeout=120"; BENCH_LIMIT="--timeout=150"; fi
if ! $PY -c "import pytest_benchmark" 2>/dev/null; then
    echo "pytest-benchmark is not installed: the benchmarks cannot run (pip install pytest-benchmark)"
fi

echo "== 0/3 tiles chosen on this device vs the ahead-of-time audit (benchmarks/aot_audit.json)"
$PY -m benchmarks.aot_audit --live --compare benchmarks/aot_audit.json 2>&1 | tee "$OUT_DIR/configs.txt"
configs_rc=${PIPESTATUS[0]}

echo "== 1/3 kernel correctness tests, compiled ($TESTS, budget ${TEST_BUDGET}s)"
# shellcheck disable=SC2086
timeout -s INT -k 15 "$TEST_BUDGET" $PY -m pytest $TESTS -q -rfEs -p no:cacheprovider $TEST_LIMIT \
    2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2/3 full-scale benchmarks (budget ${BENCH_BUDGET}s)"
# Most important groups first: a budget cut loses the least.
timeout -s INT -k 30 "$BENCH_BUDGET" $PY -m pytest \
    benchmarks/bench_contrastive.py benchmarks/bench_attention.py benchmarks/bench_generation_loss.py \
    benchmarks/bench_train_step.py benchmarks/bench_model.py benchmarks/bench_data.py \
    --benchmark-only --benchmark-json="$OUT_DIR/bench.json" $BENCH_LIMIT -q -rs -p no:cacheprovider \
    --benchmark-columns=median,rounds 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}
bench_note="benchmarks exit ${bench_rc}"
[ "$bench_rc" -eq 124 ] && bench_note="benchmarks stopped at the ${BENCH_BUDGET}s budget: later groups are missing"

# -- train group (benchmarks/bench_train.py): loader -> model -> loss -> optimizer, B/16 LAION pairs and
#    B/32 MMC4 documents; reference vs lcl-fast eager / --pack / compiled. Own budget and JSON
#    (LCL_GPU_TRAIN_BUDGET_S, default 120; 0 skips it); its ratios print in train.log's summary table.
TRAIN_BUDGET=${LCL_GPU_TRAIN_BUDGET_S:-120}
train_rc=0
if [ "$TRAIN_BUDGET" -gt 0 ]; then
    echo "== train group (budget ${TRAIN_BUDGET}s)"
    timeout -s INT -k 30 "$TRAIN_BUDGET" $PY -m pytest benchmarks/bench_train.py --benchmark-only \
        --benchmark-json="$OUT_DIR/bench_train.json" -q -rs -p no:cacheprovider --benchmark-columns=median,rounds \
        2>&1 | tee "$OUT_DIR/train.log"
    train_rc=${PIPESTATUS[0]}
fi

echo "== 3/3 report"
report_rc=1
if [ -s "$OUT_DIR/bench.json" ]; then
    $PY -m benchmarks.report "$OUT_DIR/bench.json" --out "$OUT_DIR/RESULTS.md" \
        --plot "$OUT_DIR/contrastive_memory.png" \
        --note "benchmarks/gpu_check.sh on $(hostname): tests exit ${tests_rc}; ${bench_note}"
    report_rc=$?
    cat "$OUT_DIR/RESULTS.md"
fi
echo "tiles vs audit exit ${configs_rc} (informational), tests exit ${tests_rc}, benchmarks exit ${bench_rc}, train group exit ${train_rc}, report exit ${report_rc}"
for rc in "$tests_rc" "$bench_rc" "$report_rc"; do
    [ "$rc" -ne 0 ] && exit "$rc"
done
exit 0
