#!/usr/bin/env bash
# Multi-node training under Slurm: one torchrun per node, 8 GPUs each, HSDP across nodes.
#
#   sbatch scripts/slurm_train.sh train_configs/longhorn_1b.toml [--section.key value ...]
#
# Node 0's hostname is the rendezvous endpoint. When the job is preempted, Slurm sends
# SIGTERM; the trainer saves a checkpoint and exits, and `--requeue` starts the job again,
# which resumes from that checkpoint. Adjust the #SBATCH lines to the cluster.
#SBATCH --job-name=longhorn-zoo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=8
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export RDZV_ENDPOINT="$HEAD_NODE:29500" RDZV_ID="$SLURM_JOB_ID" NNODES="$SLURM_NNODES" NGPU="$GPUS_PER_NODE"

# srun starts run_train.sh once per node; each learns its NODE_RANK from SLURM_NODEID.
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec ./run_train.sh "$@"' _ "$@" \
    --parallelism.data_parallel_replicate_degree "$SLURM_NNODES"
