#!/usr/bin/env bash
# The GPU acceptance check: one command for a lent GPU machine, prepared before the lease starts.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine (see docs/gpu-results.md)
#   bash scripts/gpu_check.sh --cpu [--out DIR] # the same steps on CPU, small (CI runs it)
#
# On the GPU (the device tool's nvidia-h200: Python 3.12, torch with CUDA, triton, transformers; no
# megatron-core, no network) it installs the wheels that scripts/gpu_wheels.sh put in .whl/ (carry
# it), then runs each step in its own process under its own time box, the whole inside 8 minutes:
#   1  the gpu-marked tests            2a same logits on CUDA and CPU   2b mamba-ssm Triton vs torch kernels
#   3  one bf16 RLP step, tok/s + MFU   4  the rollout benchmark          5  the Hugging Face round trip
# Each step ends PASS, FAIL or SKIPPED with its reason; a step killed at its box is a FAIL that says
# so. It writes gpu_check.md (one table), gpu_check.json and gpu_check.log to $OUT (the device
# tool's folder), to --out DIR, or to outputs/gpu_check/. Exit status: 0 when no step FAILed.
#
# --cpu hides CUDA and runs every step's code on the CPU platform with small models, up to the calls
# that need CUDA (those steps say SKIPPED), in under 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD

MODE=cuda
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) MODE=cpu ;;
        --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT_DIR=${OUT_DIR:-$REPO/outputs/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

PYTHON=${PYTHON:-python3}
# The seconds the whole run may take, and each step's box (cut to what is left of the whole). The
# device lease gives a command 10 minutes: 8 for this script leaves room for the machine's start.
if [ "$MODE" = cuda ]; then
    BUDGET=460
    declare -A BOX=([gpu_tests]=60 [cuda_vs_cpu]=75 [rlp_step]=135 [rollout_bench]=60 [hf_roundtrip]=30 [mamba_kernels]=120)
else
    BUDGET=280
    declare -A BOX=([gpu_tests]=60 [cuda_vs_cpu]=75 [rlp_step]=90 [rollout_bench]=60 [hf_roundtrip]=45 [mamba_kernels]=40)
    export CUDA_VISIBLE_DEVICES=""   # the CPU platform, even on a machine with a GPU
    # Tiny models: one thread each. On a busy machine, OpenMP threads that spin-wait for a core
    # slow small tensor work down by orders of magnitude.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# The running order (the report lists them by number): 2b last, since compiling and autotuning
# mamba-ssm's Triton kernels takes the longest and matters least if the budget runs out.
STEPS=(gpu_tests cuda_vs_cpu rlp_step rollout_bench hf_roundtrip mamba_kernels)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG=$OUT_DIR/gpu_check.log
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# This checkout's nemo_rlp, ahead of any installed copy.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "[gpu_check] $*" | tee -a "$LOG"; }

# Wheels from .whl/ (scripts/gpu_wheels.sh) into a folder of their own, first on the path. Only on
# the GPU machine: --cpu runs with the Python environment it is given.
install_carried_wheels() {
    local wheels=("$REPO"/.whl/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        say "no wheels in .whl/: using the installed packages (scripts/gpu_wheels.sh makes them)"
        return 0
    fi
    say "installing ${#wheels[@]} carried wheels into /tmp/site"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}" >>"$LOG" 2>&1; then
        say "pip could not install the carried wheels (see gpu_check.log)"
        return 1
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
}

# mamba-ssm's sources (kept as its source archive by gpu_wheels.sh), for its Triton kernels (step 2b).
unpack_mamba_ssm_sources() {
    local archives=("$REPO"/.whl/mamba_ssm-*.tar.gz)
    [ -e "${archives[0]}" ] || return 0
    mkdir -p "$WORK/mamba_ssm_src"
    if tar -xzf "${archives[0]}" -C "$WORK/mamba_ssm_src" --wildcards '*/mamba_ssm/*' 2>>"$LOG"; then
        GPU_CHECK_MAMBA_SSM_SRC=$(find "$WORK/mamba_ssm_src" -mindepth 1 -maxdepth 1 -type d | head -n 1)
        export GPU_CHECK_MAMBA_SSM_SRC
    else
        say "could not unpack ${archives[0]}"
    fi
}

# Run one step under its box (or what is left of the budget); record and print its result.
run_step() {
    local name=$1 box=${BOX[$1]}
    local left=$((BUDGET - SECONDS))
    [ "$box" -gt "$left" ] && box=$left
    local start=$EPOCHREALTIME rc
    if [ "$box" -lt 5 ]; then
        rc=125
        : >"$WORK/$name.log"
    else
        timeout --kill-after=10 "$box" "$PYTHON" scripts/gpu_check.py step "$name" --mode "$MODE" \
            --work "$WORK" --seconds "$box" >"$WORK/$name.log" 2>&1
        rc=$?
    fi
    { echo "===== step $name (exit status $rc)"; cat "$WORK/$name.log"; } >>"$LOG"
    local seconds
    seconds=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    "$PYTHON" scripts/gpu_check.py finalize "$name" --work "$WORK" --rc "$rc" --seconds "$seconds" \
        --box "$box" | tee -a "$LOG"
}

say "mode $MODE, budget ${BUDGET} s, output in $OUT_DIR, scratch in $WORK"
ready=1
if [ "$MODE" = cuda ]; then
    install_carried_wheels || ready=0
fi
unpack_mamba_ssm_sources
# Versions and the machine, for the report; fails when the steps cannot run (no CUDA, no megatron-core).
"$PYTHON" scripts/gpu_check.py env --mode "$MODE" --work "$WORK" >>"$LOG" 2>&1 || ready=0
if [ "$ready" = 1 ]; then
    for name in "${STEPS[@]}"; do
        run_step "$name"
    done
else
    say "the environment is not ready: no step runs (see gpu_check.log)"
fi
"$PYTHON" scripts/gpu_check.py report --work "$WORK" --out "$OUT_DIR" --started "$STARTED" \
    --budget "$BUDGET" --seconds "$SECONDS"
status=$?
echo
cat "$OUT_DIR/gpu_check.md"
say "wrote $OUT_DIR/gpu_check.md and gpu_check.json ($SECONDS s)"
rm -rf "$WORK"
exit "$status"
