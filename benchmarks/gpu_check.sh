#!/usr/bin/env bash
# One-call GPU check for a bare H100/H200 machine: no network, `python3` with its own CUDA torch
# and Triton (pytest present), nvcc for the extension. Builds the extension with its CUDA kernels,
# runs the GPU tests, measures, and prints one table; <= 7 minutes on an H200.
#
#     bash benchmarks/gpu_check.sh              # results in $OUT if set, else ./gpu_results/
#     bash benchmarks/gpu_check.sh --cpu-smoke  # dry run of every Python phase on CPU, tiny shapes
#
# Phases, in order, each under its own `timeout` (a hang or a slow phase costs that phase only)
# and recorded whatever its outcome; the script always goes on and ends with the summary:
#   env        versions, device, the torch / Triton APIs the kernels rely on
#   build      ADELLO_FORCE_CUDA=1 pip install --no-build-isolation -e . (setup.py build_ext
#              --inplace as a fallback), this GPU's architecture only; fails loudly unless
#              'cuda' is in available_backends()
#   tests      pytest -m gpu over tests/, then the contract tests (tests/test_contract.py)
#   bandwidth  fused forward GB/s at B = N = 65536, C = 1000 (fp32, bf16) vs the copy bandwidth
#   steps      imagenet127 ADELLOLoss steps (fp32, bf16): eager / torch.compile / triton / cuda
#   graph      a CUDA-graph-replayed ADELLOLoss step, and its replay against eager steps
#   launches   torch.profiler kernels per step; the host-sync check (sync debug mode "error"
#              around a validate=False forward + backward + update)
#   memcheck   compute-sanitizer --tool memcheck over tiny steps of every regime (if present)
#   registers  registers / spills / shared memory of the row kernel, programs per SM, grid
#   sweep      the Triton step's launch heuristics at the bandwidth shape (tuning data)
#   table      benchmarks/compare.py: the rest of the benchmark table (fp32, every shape)
# Output ($OUT, 3 files): gpu_check.json (every phase's numbers and status), summary.txt (the
# table printed last), logs.tar.gz (each phase's log and the JUnit XML).
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 410 s, all phases).
set -o pipefail
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SMOKE=0
if [[ ${1:-} == --cpu-smoke ]]; then
    SMOKE=1
fi
OUT_DIR=${OUT:-$ROOT/gpu_results}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG_DIR=$WORK/logs
mkdir -p "$OUT_DIR" "$LOG_DIR"
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || { echo "gpu_check: $PY not found (set PYTHON)"; exit 2; }
BUDGET=${GPU_CHECK_BUDGET_S:-410}
SUMMARY_RESERVE=10
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
PHASES=$WORK/phases.tsv
: > "$PHASES"
FAILED=0

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the tree, even if the install fails
export PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1   # no network on the GPU machine
BENCH=(benchmarks/gpu_bench.py)
if ((SMOKE)); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    BENCH+=(--cpu-smoke)
fi

# phase NAME CAP_SECONDS COMMAND...: run COMMAND under min(CAP, time left) seconds, log it,
# record "name status exit seconds last-pytest-line" in $PHASES. Never exits the script.
phase() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - SUMMARY_RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        printf '%s\tskipped\t-\t0\tno time left\n' "$name" >> "$PHASES"
        echo "[gpu_check] $name: skipped (no time left)"
        return 0
    fi
    echo "[gpu_check] $name: running (limit ${limit}s)"
    local start rc status last
    start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $status == ok ]] || FAILED=1
    last=$(grep -E "[0-9]+ (passed|failed|error|skipped)" "$LOG_DIR/$name.log" | tail -n 1 \
        | tr -d '=\t' | sed 's/^ *//')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - start))" "$last" \
        >> "$PHASES"
    echo "[gpu_check] $name: $status (exit $rc, $(($(date +%s) - start))s) $last"
    if [[ $status != ok ]]; then
        tail -n 25 "$LOG_DIR/$name.log" | sed 's/^    /    | /'
    fi
    return 0
}

build() {
    if ((SMOKE)); then
        echo "cpu smoke: no build; backends:"
        "$PY" -c "import adello_kernels as ak; print(ak.available_backends())"
        return
    fi
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    echo "TORCH_CUDA_ARCH_LIST=$arch"
    export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) ADELLO_FORCE_CUDA=1
    "$PY" -m pip install --no-build-isolation --no-deps -e . -q ||
        { echo "pip install failed; trying setup.py build_ext --inplace"; \
          "$PY" setup.py build_ext --inplace; } || return 1
    "$PY" - <<'EOF'
import adello_kernels as ak
backends = ak.available_backends()
print("backends:", backends)
if "cuda" not in backends:
    raise SystemExit("BUILD CHECK FAILED: 'cuda' is not in available_backends() after a forced "
                     "CUDA build")
EOF
}

tests() {
    local rc=0
    if ((SMOKE)); then
        "$PY" -m pytest tests/test_triton_kernel.py -m gpu -q -p no:cacheprovider -rfEs
        return
    fi
    "$PY" -m pytest tests/ -m gpu -q -p no:cacheprovider -rfEs \
        --junitxml="$LOG_DIR/gpu_tests.xml" || rc=1
    "$PY" -m pytest tests/test_contract.py -q -p no:cacheprovider -rfE -x \
        --junitxml="$LOG_DIR/contract_tests.xml" || rc=1
    return $rc
}

memcheck() {
    local tool
    tool=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null \
        | head -n 1)
    if ((SMOKE)) || [[ -z $tool ]]; then
        echo "compute-sanitizer: ${tool:-not found}; running the phase without it"
        "$PY" "${BENCH[@]}" memcheck --json "$WORK/part_memcheck.json"
        return
    fi
    echo "using $tool"
    # Compile the kernels first, outside the sanitizer (the JIT is slow under it).
    "$PY" "${BENCH[@]}" memcheck > /dev/null 2>&1 || true
    "$tool" --tool memcheck --error-exitcode 9 --print-limit 20 \
        "$PY" "${BENCH[@]}" memcheck --json "$WORK/part_memcheck.json"
}

table() {
    local args=(--dtype fp32 --rounds 5 --target-ms 20 --json "$WORK/compare_fp32.json")
    if ((SMOKE)); then
        args=(--device cpu --shapes cifar100 --providers eager --rounds 2 --target-ms 5
              --json "$WORK/compare_fp32.json")
    else
        args+=(--device cuda)
    fi
    "$PY" benchmarks/compare.py "${args[@]}"
}

export -f build tests memcheck table
export PY SMOKE WORK LOG_DIR

bench() {  # bench NAME CAP: one gpu_bench.py subcommand as a phase, its JSON in $WORK
    local name=$1 cap=$2
    phase "$name" "$cap" "$PY" "${BENCH[@]}" "$name" --json "$WORK/part_$name.json"
}

# The phases need not stay in the environment of the benchmark children.
BENCH_STR="${BENCH[*]}"
export BENCH_STR

# Caps add up to more than the budget on purpose: a fast build leaves the time to the later
# phases; a slow one cuts the tuning sweep and the table first.
bench env 20
phase build 150 bash -c build
phase tests 100 bash -c tests
bench bandwidth 40
bench steps 70
bench graph 25
bench launches 25
phase memcheck 50 bash -c 'BENCH=($BENCH_STR); memcheck'
bench registers 20
bench sweep 45
phase table 45 bash -c table

# ---- summary: gpu_check.json, summary.txt, logs.tar.gz ---------------------------------------
if [[ -f $WORK/compare_fp32.json ]]; then
    cp "$WORK/compare_fp32.json" "$WORK/part_table.json"
fi
cp "$PHASES" "$LOG_DIR/phases.tsv"
"$PY" benchmarks/gpu_bench.py summary --dir "$WORK" 2>&1 | tee "$OUT_DIR/summary.txt"
cp "$WORK/gpu_check.json" "$OUT_DIR/gpu_check.json" 2> /dev/null || true
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs
echo "[gpu_check] $(($(date +%s) - T0)) s; results in $OUT_DIR (gpu_check.json, summary.txt," \
    "logs.tar.gz)"
rm -rf "$WORK"
exit $FAILED
