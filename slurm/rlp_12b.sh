#!/usr/bin/env bash
# RLP on Nemotron-Nano-12B-v2 with the paper's settings (nemo_rlp/conf/experiment/rlp_nemotron_nano_12b_v2.yaml):
# TP = 8, one node per model replica, 8 nodes = 8 data-parallel replicas of 64 contexts each.
# Submit from the repository root; every argument is a Hydra override:
#   sbatch slurm/rlp_12b.sh data.corpus=/data/corpus data.tokenizer=/ckpt/Nemotron-Nano-12B-v2-Base/tokenizer.json
#   DRY_RUN=1 bash slurm/rlp_12b.sh data.corpus=... data.tokenizer=...   (plan + srun line, no GPU)
# Set IMAGE, MOUNTS, RUN_DIR as for slurm/rlp.sh, which this runs; `sbatch --nodes=N` changes the
# data-parallel size (the plan checks it).
#SBATCH --job-name=rlp-nemotron-nano-12b-v2
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

export EXPERIMENT=rlp_nemotron_nano_12b_v2
export NODES="${SLURM_JOB_NUM_NODES:-${NODES:-8}}"
# Under sbatch this file runs from a spool copy: the repository is the submission directory.
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
export REPO
exec bash "${REPO}/slurm/rlp.sh" "$@"
