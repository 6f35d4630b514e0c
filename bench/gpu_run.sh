#!/usr/bin/env bash
# `make gpu`: validate gradkernels on one CUDA machine without network, in under 10 minutes.
#
# Usage: bash bench/gpu_run.sh [--dry-run] OUTDIR
#
# Steps (each under its own `timeout`, all under one overall deadline; see bench/GPU.md):
#   env        nvidia-smi, Python/torch/triton/numpy/ptxas versions, git revision -> OUTDIR/env.log
#   install    python3 -m pip install --no-build-isolation --no-deps -e .   (offline, the machine's own
#              torch/triton are used as they are)
#   tests      python3 -m pytest -n 4 -m "not slow" tests   (on CUDA: bf16 included, longer sequences)
#   bench      python3 -m gradkernels.bench all --quick --out OUTDIR/bench, TRITON_PRINT_AUTOTUNING=1
#   aot        python3 -m gradkernels.aot check --arch native: this GPU's architecture, every config;
#              checks the configs the autotuner picked during `bench` against it
#   aot_real   python3 -m gradkernels.aot compare-real: the same compile for a few cases, launched for
#              real: AOT registers/spills/smem vs the loaded kernel's
#   tests_slow python3 -m pytest -n 4 -m slow tests, with the time that is left
# then a summary table, printed last (also in OUTDIR/summary.txt).
#
# Environment: PYTHON (default python3), GPU_RUN_BUDGET_S (overall deadline in seconds, default 570),
# PYTEST_WORKERS (default 4). Exit status: 0 when every step passed, 1 otherwise, 2 on a usage error,
# 3 when there is no usable CUDA GPU.
# The step_* functions run in a child bash (exported, see run_step): not unreachable.
# shellcheck disable=SC2317
set -uo pipefail

usage() {
    echo "usage: bash bench/gpu_run.sh [--dry-run] OUTDIR" >&2
    echo "  runs the test suite, the benchmarks and the AOT report on this machine's CUDA GPU;" >&2
    echo "  logs and results go to OUTDIR (created if missing). See bench/GPU.md." >&2
}

DRY_RUN=0
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        -*) echo "error: unknown option $1" >&2; usage; exit 2 ;;
        *)
            if [[ -n "$OUT" ]]; then
                echo "error: one OUTDIR expected, got '$OUT' and '$1'" >&2; usage; exit 2
            fi
            OUT="$1" ;;
    esac
    shift
done
if [[ -z "$OUT" ]]; then
    echo "error: OUTDIR missing" >&2; usage; exit 2
fi

PY="${PYTHON:-python3}"
BUDGET_S="${GPU_RUN_BUDGET_S:-570}"
WORKERS="${PYTEST_WORKERS:-4}"
if ! [[ "$BUDGET_S" =~ ^[0-9]+$ && "$WORKERS" =~ ^[0-9]+$ ]]; then
    echo "error: GPU_RUN_BUDGET_S and PYTEST_WORKERS must be whole numbers" >&2; exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

# Steps: a time cap each (seconds) and a function. Caps add up to more than the budget on purpose: a
# step that finishes early leaves its time to the later ones; the overall deadline bounds the run.
STEP_NAMES=(env install tests bench aot aot_real tests_slow)
declare -A CAP=([env]=30 [install]=120 [tests]=240 [bench]=150 [aot]=90 [aot_real]=120 [tests_slow]=150)

step_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
    nvidia-smi
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c 'import sys, numpy, torch, triton
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())'
}
step_install() { "$PY" -m pip install --no-build-isolation --no-deps -e .; }
step_tests() {
    "$PY" -m pytest -n "$WORKERS" -q -m "not slow" -p no:cacheprovider --junitxml="$OUT/tests.xml" tests
}
step_bench() {
    TRITON_PRINT_AUTOTUNING=1 "$PY" -m gradkernels.bench all --quick --out "$OUT/bench"
}
step_aot() {
    local picks=()
    if [[ -s "$OUT/bench.log" ]]; then picks=(--autotune-log "$OUT/bench.log"); fi
    "$PY" -m gradkernels.aot check --arch native --failures-only --json "$OUT/aot.json" "${picks[@]}"
}
step_aot_real() {
    "$PY" -m gradkernels.aot compare-real --arch native --kernel linear --case fwd-gelu,dw-gelu-split \
        --dtype bf16,fp32-tf32 &&
    "$PY" -m gradkernels.aot compare-real --arch native --kernel attn --case attn-fwd-d128-causal --dtype bf16
}
step_tests_slow() {
    "$PY" -m pytest -n "$WORKERS" -q -m slow -p no:cacheprovider --junitxml="$OUT/tests_slow.xml" tests
}

if [[ "$DRY_RUN" == 1 ]]; then
    echo "dry run: budget ${BUDGET_S}s, output to $OUT, python $PY, $WORKERS pytest workers"
    for s in "${STEP_NAMES[@]}"; do
        printf '%-10s cap %4ss\n' "$s" "${CAP[$s]}"
        declare -f "step_$s" | sed '1,2d;$d'
    done
    exit 0
fi

# Refuse early, with the reason, where this cannot work.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU here (nvidia-smi missing or failing): make gpu needs a CUDA machine." >&2
    echo "       Without a GPU use 'make test' (interpreter) and 'make aot' (compile report)." >&2
    exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "error: $PY cannot use CUDA (torch missing or torch.cuda.is_available() is False)." >&2
    exit 3
fi

mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
SUMMARY_TSV="$OUT/steps.tsv"
: > "$SUMMARY_TSV"
START=$SECONDS
DEADLINE=$((START + BUDGET_S))
export PY OUT WORKERS ROOT
for s in "${STEP_NAMES[@]}"; do export -f "step_$s"; done

# Last line of a log that matches a pattern (for the summary), or empty.
last_match() { grep -E "$2" "$1" 2>/dev/null | tail -n 1; }

run_step() {
    local name=$1 cap=${CAP[$1]} log="$OUT/$1.log" left limit rc t0 status detail
    left=$((DEADLINE - SECONDS))
    limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        printf '%s\t%s\t%s\t%s\n' "$name" "SKIPPED" 0 "no time left in the ${BUDGET_S}s budget" >> "$SUMMARY_TSV"
        return
    fi
    echo "== $name (limit ${limit}s)"
    t0=$SECONDS
    # A child bash runs the step so that `timeout` can stop it (and everything it started) as a whole.
    timeout --kill-after=10 "$limit" bash -c "cd \"\$ROOT\" && step_$name" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    case "$name" in
        tests|tests_slow) detail="$(last_match "$log" '(passed|failed|error|no tests ran)')" ;;
        bench) detail="$(find "$OUT/bench" -type f 2>/dev/null | wc -l) files in bench/" ;;
        aot) detail="$(last_match "$log" 'rows compiled')" ;;
        aot_real) detail="$(grep -c -- '-> same' "$log" 2>/dev/null) same, $(grep -cE -- '-> (DIFFERS|FAIL)' "$log" 2>/dev/null) differ" ;;
        *) detail="$(tail -n 1 "$log" 2>/dev/null)" ;;
    esac
    detail="${detail//$'\t'/ }"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "${detail:0:90}" >> "$SUMMARY_TSV"
    tail -n 3 "$log"
}

for s in "${STEP_NAMES[@]}"; do
    run_step "$s"
done

{
    echo
    echo "gradkernels GPU run: $(head -n 1 "$OUT/env.log" 2>/dev/null | sed 's/^date: //'), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1), $((SECONDS - START))s of ${BUDGET_S}s; logs in $OUT"
    printf '%-10s  %-10s  %5s  %s\n' step status s detail
    printf '%-10s  %-10s  %5s  %s\n' ---------- ---------- ----- ------
    while IFS=$'\t' read -r name status secs detail; do
        printf '%-10s  %-10s  %5s  %s\n' "$name" "$status" "$secs" "$detail"
    done < "$SUMMARY_TSV"
} | tee "$OUT/summary.txt"

if cut -f2 "$SUMMARY_TSV" | grep -qv '^ok$'; then
    exit 1
fi
exit 0
