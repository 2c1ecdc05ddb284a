#!/usr/bin/env bash
# Launch training with torchrun, on one node or several.
#
#   ./run_train.sh [CONFIG] [--section.key value ...]
#
# CONFIG is a TOML file or the name of a shipped config (debug_llama, longhorn_1b, ...); without
# it, $CONFIG_FILE, else train_configs/debug_longhorn.toml. Every further argument is a config
# override passed to `python -m longhorn_zoo.train`. Environment variables:
#
#   CONFIG_FILE    the config when no CONFIG argument is given
#   LOG_RANK       comma-separated local ranks whose output is shown (default 0)
#   NGPU           processes per node (default 1): one per GPU; with no GPU the run is
#                  on CPU with gloo and NGPU is the number of CPU processes
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's index, 0 .. NNODES-1 (default 0)
#   RDZV_ENDPOINT  host:port of the rendezvous, reachable from every node
#                  (default localhost:29500; set it to node 0's address across nodes)
#   RDZV_ID        job id shared by the nodes of one run (default longhorn_zoo)
#
# Examples:
#   ./run_train.sh                                            # debug Longhorn, 1 process
#   CONFIG_FILE=train_configs/debug_gla.toml ./run_train.sh --training.steps 20
#   NGPU=8 ./run_train.sh train_configs/llama_1b.toml --compile.enable true
#   NGPU=8 NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 ./run_train.sh train_configs/longhorn_1b.toml \
#       --parallelism.data_parallel_replicate_degree 2     # HSDP: replicate across the 2 nodes
# A killed run resumes from its newest complete checkpoint when started again with the
# same command (checkpoint.enable = true). See scripts/slurm_train.sh for Slurm.
#
# SIGTERM (a preemption) reaches the training processes alone: they finish the step, save a
# checkpoint, print one line and exit 0, and so does this script. torchrun itself ignores
# SIGTERM, because it would otherwise stop with a SignalException traceback and status 1.
set -euo pipefail

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RDZV_ID=${RDZV_ID:-longhorn_zoo}
LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_longhorn.toml}
if [[ $# -gt 0 && $1 != --* ]]; then
    CONFIG_FILE=$1
    shift
fi
if [[ -f $CONFIG_FILE ]]; then
    CONFIG_FILE=$(realpath "$CONFIG_FILE")  # a file relative to the caller's folder, before the cd below
fi

cd "$(dirname "$0")"
if [[ $NNODES -eq 1 ]]; then
    RDZV=(--standalone)
else
    RDZV=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --node-rank "$NODE_RANK")
fi

# NCCL's NVLink multicast (NVLS) stays off unless the caller turns it on.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
trap '' TERM  # inherited by torchrun, which leaves SIGTERM out of the signals it handles (below)
python -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NGPU" "${RDZV[@]}" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 --signals-to-handle SIGINT,SIGHUP,SIGQUIT \
    -m longhorn_zoo.train "$CONFIG_FILE" "$@" &
launcher=$!
trap 'pkill -TERM -P "$launcher" || true' TERM  # forward to torchrun's children, the training processes
status=0
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher" && status=0 || status=$?  # returns early, >128, when the trap runs: wait again
done
exit "$status"
