#!/usr/bin/env bash
# RLP training on a Slurm cluster with pyxis/enroot: one task per GPU, in the NeMo container.
# This is the common launcher; slurm/rlp_12b.sh and slurm/rlp_qwen3_1p7b.sh set an experiment and
# their own #SBATCH header and run it. Submit from the repository root:
#   sbatch --nodes=2 slurm/rlp.sh model=... parallel.tensor_model_parallel_size=8 trainer.steps=1000
#   EXPERIMENT=rlp_qwen3_1p7b sbatch --nodes=8 slurm/rlp.sh data.corpus=... data.tokenizer=...
# Every argument is passed to `python -m nemo_rlp.train` as a Hydra override.
#
#   DRY_RUN=1 bash slurm/rlp.sh [overrides]
# checks the config and the layout without a GPU, on this machine (a CPU install of the package, as
# in the README's quick start): it runs `python -m nemo_rlp.plan` with the job's node count and the
# same overrides, prints the srun line, and exits with the plan's status (0 fits, 1 does not fit,
# 2 config error).
#
# Environment (all optional): EXPERIMENT (a name in nemo_rlp/conf/experiment/), IMAGE (a container image or
# .sqsh file; a .sqsh built once from ./Dockerfile starts fastest), MOUNTS (comma-separated
# src:dst, e.g. "$PWD:$PWD,/lustre/data:/lustre/data"), RUN_DIR (per-job output directory),
# NODES and GPUS_PER_NODE (taken from Slurm inside a job), PREFLIGHT=0 (skip the in-job plan),
# PYTHON (the interpreter of the dry run), GPU_MEMORY_GIB (default 80).
#
# Preemption and the time limit: Slurm sends SIGUSR1 to every task 300 s before the time limit
# (--signal) and SIGTERM on preemption. The trainer then saves a checkpoint at the next step boundary
# and exits with status 75; this script requeues the job (--requeue), whose tasks resume from the
# checkpoint in RUN_DIR (the same directory: RUN_DIR is named after the job id, which a requeue keeps).
#SBATCH --job-name=nemo-rlp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

REQUEUE_EXIT_CODE=75  # nemo_rlp.training.preemption.REQUEUE_EXIT_CODE

EXPERIMENT="${EXPERIMENT:-}"
IMAGE="${IMAGE:-nvcr.io/nvidia/nemo:26.06.00}"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
NODES="${SLURM_JOB_NUM_NODES:-${NODES:-1}}"
GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-8}}"
GPU_MEMORY_GIB="${GPU_MEMORY_GIB:-80}"
JOB_ID="${SLURM_JOB_ID:-local}"
JOB_NAME="${SLURM_JOB_NAME:-${EXPERIMENT:-nemo-rlp}}"
RUN_DIR="${RUN_DIR:-${REPO}/outputs/${JOB_NAME}-${JOB_ID}}"
MOUNTS="${MOUNTS:-${REPO}:${REPO}}"
PYTHON="${PYTHON:-python}"

overrides=()
if [[ -n "${EXPERIMENT}" ]]; then
    overrides+=("+experiment=${EXPERIMENT}")
fi
overrides+=("$@")

# What megatron-core and the trainer expect of the environment. srun gives each task SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID; the entry point reads torchrun's names, so each task maps them.
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron-core: kernels queue in issue order (TP overlap)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a failed collective ends the job instead of hanging it
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # rollouts change shapes
export PYTHONUNBUFFERED=1
export HYDRA_FULL_ERROR=1

container=(--container-image="${IMAGE}" --container-mounts="${MOUNTS}" --container-workdir="${REPO}"
           --no-container-mount-home)
plan_args=(--nodes "${NODES}" --gpus-per-node "${GPUS_PER_NODE}" --gpu-memory-gib "${GPU_MEMORY_GIB}"
           "${EXPERIMENT:-none}" "$@")
# shellcheck disable=SC2016  # $SLURM_* and "$@" expand in each task's shell, not here
cmd=(srun --nodes="${NODES}" --ntasks-per-node="${GPUS_PER_NODE}" --kill-on-bad-exit=1
     --output="${RUN_DIR}/rank-%t.log" --open-mode=append "${container[@]}"
     bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec python -m nemo_rlp.train "$@"' _
     "logging.output_dir=${RUN_DIR}" "hydra.run.dir=${RUN_DIR}" "${overrides[@]}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# plan (this machine, no GPU): ${PYTHON} -m nemo_rlp.plan ${plan_args[*]}"
    set +e
    (cd "${REPO}" && "${PYTHON}" -m nemo_rlp.plan "${plan_args[@]}")
    status=$?
    set -e
    echo "# srun line (${NODES} node(s) x ${GPUS_PER_NODE} tasks, run directory ${RUN_DIR}):"
    printf '%q ' "${cmd[@]}"
    echo
    exit "${status}"
fi

mkdir -p "${RUN_DIR}"
echo "nemo-rlp: job ${JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NODES} node(s); run directory ${RUN_DIR}"

if [[ "${PREFLIGHT:-1}" == "1" ]]; then
    # The same plan as the dry run, in the container on one task with no GPU visible (it builds the
    # model on the meta device): a layout that cannot fit stops here, before every node starts.
    srun --nodes=1 --ntasks=1 --output="${RUN_DIR}/plan.log" "${container[@]}" \
        env CUDA_VISIBLE_DEVICES= python -m nemo_rlp.plan "${plan_args[@]}" || {
        echo "nemo-rlp: the plan refuses this config or layout (see ${RUN_DIR}/plan.log); PREFLIGHT=0 skips it" >&2
        exit 1
    }
fi

set +e
"${cmd[@]}"
status=$?
set -e
if [[ "${status}" -eq "${REQUEUE_EXIT_CODE}" ]]; then
    echo "nemo-rlp: stopped by a preemption signal after a checkpoint; requeueing job ${JOB_ID}"
    scontrol requeue "${JOB_ID}"
fi
exit "${status}"
