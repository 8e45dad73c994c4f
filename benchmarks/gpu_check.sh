#!/usr/bin/env bash
# GPU check in one device call: under 7 minutes on one H100 (compiles included), no network.
#
#   bash benchmarks/gpu_wheels.sh .whl            # here, with network: ftfy, wcwidth, braceexpand wheels
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # on the GPU; default OUT_DIR: $OUT, else benchmarks/gpu_results
#   bash benchmarks/gpu_check.sh --dry-run [OUT]  # the same script on a CPU: tiny shapes, TRITON_INTERPRET=1
#
# Stages, in order of value (each with its own budget, all under a global deadline):
#   kernels  compiled Triton kernels vs the torch path, fwd + bwd, at the models' shapes, bf16/fp16/fp32:
#            attention (documents + image blocks), contrastive over ragged ranks, LM-head CE
#   model    one full B/16 model forward + backward, impl="triton" vs impl="torch" (fp32, bf16 autocast)
#   tiles    the tiles chosen on this device vs the audit's records (benchmarks/aot_audit.json):
#            choices, spills and shared memory, for the running Triton release
#   ops      op benchmarks vs the reference at the B/16 LAION and B/32 MMC4 shapes (SDPA, Flex, flash-attn
#            when present)
#   train    the `train` group: eager, packed and compiled, 30 steps each (B/16 LAION, then B/32 MMC4)
#   report   RESULTS.md (+ contrastive_memory.png) from the op benchmarks
# After every stage $OUT_DIR/gpu_check.json is rewritten (atomically): a kill keeps what finished.
# OUT_DIR gets at most 8 files: gpu_check.json, gpu_check.log, bench.json, bench_train.json, RESULTS.md,
# contrastive_memory.png. Exit 0 when every stage passed (in a dry run: or was skipped by design), else 1.
#
# Wheels: installed offline (pip --no-index --find-links, into a folder put on PYTHONPATH) from
# $LCL_GPU_WHEELS (default .whl/ in the repository) when that folder holds wheels. The dry run first hides
# the interpreter's own ftfy/wcwidth/braceexpand (shadow modules that raise ImportError), so it proves the
# wheels are enough. Knobs: LCL_GPU_DEADLINE_S (whole check, default 400), LCL_GPU_BUDGET_<STAGE>_S
# (e.g. LCL_GPU_BUDGET_TRAIN_S), PYTHON (the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-benchmarks/gpu_results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python}
START=$(date +%s)
DEADLINE=${LCL_GPU_DEADLINE_S:-400}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lcl_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
JSON="$OUT_DIR/gpu_check.json"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
STAGES="kernels,model,tiles,ops,train,report"
log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 LCL_BENCH_SCALE=smoke CUDA_VISIBLE_DEVICES=""
    # hide the interpreter's own copies: the wheels' folder (first on PYTHONPATH) must supply them
    mkdir -p "$WORK/hide"
    for mod in ftfy wcwidth braceexpand; do
        echo "raise ModuleNotFoundError(\"No module named '$mod' (hidden by gpu_check.sh --dry-run)\", name='$mod')" \
            > "$WORK/hide/$mod.py"
    done
    export PYTHONPATH="$WORK/hide${PYTHONPATH:+:$PYTHONPATH}"
    $PY -c "import ftfy" 2>/dev/null && { log "dry run: could not hide ftfy"; exit 1; }
else
    export TRITON_INTERPRET=0 LCL_BENCH_SCALE=${LCL_BENCH_SCALE:-full}
fi

# -- wheels, offline
WHEELS=${LCL_GPU_WHEELS:-$REPO/.whl}
WHEEL_NOTE="no wheels at $WHEELS"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    if $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$WORK/site" \
        ftfy wcwidth braceexpand >> "$LOG" 2>&1; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        WHEEL_NOTE="installed offline from $WHEELS: $(cd "$WHEELS" && ls ./*.whl | tr '\n' ' ')"
    else
        WHEEL_NOTE="pip could not install the wheels from $WHEELS (see gpu_check.log)"
    fi
fi
log "wheels: $WHEEL_NOTE"
# lcl_fast.kernels is the top-level kernels/ folder mapped into the package: needs the (editable) install
$PY -c "import lcl_fast.kernels" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
    >> "$LOG" 2>&1 || log "warning: could not install lcl-fast; imports may fail"

$PY - "$WORK/env.json" "$WHEEL_NOTE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, subprocess, sys
env = {"wheels": sys.argv[2]}
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device)"
except Exception as exc:
    env["device"] = f"torch does not import: {exc}"
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:
    env["triton"] = f"does not import: {exc}"
missing = []
for mod in ("ftfy", "wcwidth", "braceexpand", "pytest_benchmark", "flash_attn"):
    try:
        __import__(mod)
    except ImportError:
        missing.append(mod)
env["missing_modules"] = missing
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=20).stdout.strip()
except Exception:
    pass
print(json.dumps(env))
json.dump(env, open(sys.argv[1], "w"))
EOF
MODE=gpu; [ "$DRY" = 1 ] && MODE=dry-run
$PY -m benchmarks.gpu_report init "$JSON" --mode "$MODE" --plan "$STAGES" --env "$WORK/env.json"
if [ "$DRY" = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: nothing to check here (try: bash benchmarks/gpu_check.sh --dry-run)"
    $PY -m benchmarks.gpu_report stage "$JSON" --name kernels --skip "no CUDA device"
    $PY -m benchmarks.gpu_report finish "$JSON"
    exit 1
fi

# stage NAME BUDGET_S [--numbers F] [--bench F] -- CMD...: run CMD under min(budget, time left), record it
stage() {
    local name=$1 budget=$2; shift 2
    local extra=()
    while [ "$1" != "--" ]; do extra+=("$1"); shift; done
    shift
    local var="LCL_GPU_BUDGET_${name^^}_S"
    budget=${!var:-$budget}
    local left=$(( DEADLINE - $(elapsed) - 10 ))
    [ "$left" -lt "$budget" ] && budget=$left
    if [ "$budget" -lt 15 ]; then
        log "== $name: skipped, $(elapsed) s of the ${DEADLINE} s deadline spent"
        $PY -m benchmarks.gpu_report stage "$JSON" --name "$name" --elapsed "$(elapsed)" \
            --skip "the check's ${DEADLINE} s deadline left no time (${left} s)"
        return
    fi
    log "== $name (budget ${budget} s, $(elapsed) s spent): $*"
    local t0 rc ms
    t0=$(date +%s%N)
    timeout -s INT -k 15 "$budget" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    local secs="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    $PY -m benchmarks.gpu_report stage "$JSON" --name "$name" --rc "$rc" --seconds "$secs" --budget "$budget" \
        --elapsed "$(elapsed)" "${extra[@]}" 2>&1 | tee -a "$LOG"
}

TINY=(); JOBS=3; DTYPES=bf16,fp16,fp32
if [ "$DRY" = 1 ]; then TINY=(--tiny); JOBS=1; DTYPES=fp16,fp32; fi  # numpy has no bfloat16: the interpreter
BENCH_OPTS=(--benchmark-only -q -rs -p no:cacheprovider --benchmark-columns=median,rounds)
$PY -c "import pytest_timeout" 2>/dev/null && BENCH_OPTS+=(--timeout=120)

stage kernels 120 --numbers "$WORK/kernels.json" -- \
    $PY -m benchmarks.gpu_kernels kernels --json "$WORK/kernels.json" --dtypes "$DTYPES" --jobs "$JOBS" "${TINY[@]}"
if [ "$DRY" = 1 ]; then  # the interpreter needs minutes for a whole model's kernels on 2 cores
    log "== model: skipped in a dry run"
    $PY -m benchmarks.gpu_report stage "$JSON" --name model --expected --elapsed "$(elapsed)" \
        --skip "dry run: the Triton interpreter needs minutes for a whole model (python -m benchmarks.gpu_kernels model --tiny)"
else
    stage model 60 --numbers "$WORK/model.json" -- $PY -m benchmarks.gpu_kernels model --json "$WORK/model.json"
fi
if [ "$DRY" = 1 ]; then  # no device: compile the quick subset for sm_90 as if it were the device
    stage tiles 60 --numbers "$WORK/tiles.json" -- $PY -m benchmarks.aot_audit --live --as-target sm_90 --quick \
        --jobs 2 --compare benchmarks/aot_audit.json --report-json "$WORK/tiles.json"
else
    stage tiles 60 --numbers "$WORK/tiles.json" -- $PY -m benchmarks.aot_audit --live --jobs 12 \
        --compare benchmarks/aot_audit.json --report-json "$WORK/tiles.json"
fi
# ops: the B/16 LAION and B/32 MMC4 shapes; contrastive at 4k and 32k pairs (the 64k case is the memory plot's)
OPS_K="not xformers and not inf_cl and not liger and not cut_cross and not n16384 and not n65536"
stage ops 90 --bench "$OUT_DIR/bench.json" -- $PY -m pytest benchmarks/bench_attention.py \
    benchmarks/bench_contrastive.py benchmarks/bench_generation_loss.py -k "$OPS_K" \
    --benchmark-json="$OUT_DIR/bench.json" "${BENCH_OPTS[@]}"
# train: eager, packed, compiled; 30 steps each, one timed round
TRAIN_K="(mmc4 or laion) and (lcl-fast] or lcl-fast-pack] or lcl-fast-compile])"
if [ "$DRY" = 1 ]; then
    TRAIN_K="(mmc4 or pairs) and (lcl-fast] or lcl-fast-pack])"  # torch.compile on 2 CPU cores: minutes
fi
STEPS=30; [ "$DRY" = 1 ] && STEPS=2
export LCL_BENCH_TRAIN_STEPS=${LCL_BENCH_TRAIN_STEPS:-$STEPS} LCL_BENCH_ROUNDS=1
stage train 110 --bench "$OUT_DIR/bench_train.json" -- $PY -m pytest benchmarks/bench_train.py -k "$TRAIN_K" \
    --benchmark-json="$OUT_DIR/bench_train.json" "${BENCH_OPTS[@]}"
unset LCL_BENCH_TRAIN_STEPS LCL_BENCH_ROUNDS
if [ -s "$OUT_DIR/bench.json" ]; then
    PLOT=(); $PY -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT_DIR/contrastive_memory.png")
    stage report 30 -- $PY -m benchmarks.report "$OUT_DIR/bench.json" --out "$OUT_DIR/RESULTS.md" "${PLOT[@]}" \
        --note "benchmarks/gpu_check.sh ($MODE) on $(hostname), $(elapsed) s into the check"
else
    $PY -m benchmarks.gpu_report stage "$JSON" --name report --skip "no op benchmark results" --elapsed "$(elapsed)"
fi
[ "$DRY" = 1 ] && log "dry run: compiled train contenders not run (torch.compile takes minutes on a CPU)"
$PY -m benchmarks.gpu_report finish "$JSON" --elapsed "$(elapsed)" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
