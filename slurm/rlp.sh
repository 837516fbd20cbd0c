#!/usr/bin/env bash
# RLP training on a Slurm cluster with pyxis/enroot: one task per GPU, NeMo container.
#   sbatch --nodes=2 slurm/rlp.sh model=... parallel.tensor_model_parallel_size=8 trainer.steps=1000
# Every argument is passed to the entry point as a Hydra override.
# DRY_RUN=1 bash slurm/rlp.sh ...   prints the srun line instead of running it.
#SBATCH --job-name=nemo-rlp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

IMAGE="${IMAGE:-nvcr.io/nvidia/nemo:26.02}"
REPO="${REPO:-$(pwd)}"
JOB_ID="${SLURM_JOB_ID:-local}"
RUN_DIR="${RUN_DIR:-${REPO}/outputs/slurm-${JOB_ID}}"
MOUNTS="${MOUNTS:-${REPO}:${REPO}}"

export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# srun gives each task SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the entry point reads torchrun's
# names, so each task maps them before starting Python.
cmd=(srun --container-image="${IMAGE}" --container-mounts="${MOUNTS}" --container-workdir="${REPO}"
     bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID exec python -m nemo_rlp.train "$@"' _
     "logging.output_dir=${RUN_DIR}" "hydra.run.dir=${RUN_DIR}" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
mkdir -p "${RUN_DIR}" logs
"${cmd[@]}"
