#!/usr/bin/env bash
# Short 1.3B training jobs for docs/benchmarks.md's step table: each model at each shape, then one
# table of tokens/s, MFU, peak memory and the ratio to llama_1b at the same shape.
#
#   bash benchmarks/train_1b.sh [OUT]        # on a GPU machine, from the repo root
#
# Environment: MODELS (default: llama longhorn mamba gla retnet rwkv hybrid, the config names
# train_configs/<model>_1b.toml; llama first, it is the ratio's base), SHAPES (default: 2048x8 8192x2 32768x1, as seq_len x micro-batch: the same tokens
# per step at every shape), STEPS (default 15; the table reads the log of the last 5 steps, after
# compilation), NGPU (default 1: FSDP2 over that many GPUs, micro-batch per GPU), EXTRA (more
# overrides for every job, e.g. "--activation_checkpoint.mode full"). A job that runs out of memory
# is a row that says so. The embedded byte corpus stands in for the prepared token shards
# (throughput does not depend on the text).
set -uo pipefail
OUT=${1:-outputs/train_1b}
MODELS=${MODELS:-llama longhorn mamba gla retnet rwkv hybrid}
SHAPES=${SHAPES:-2048x8 8192x2 32768x1}
STEPS=${STEPS:-15}
NGPU=${NGPU:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/info.txt"
# The selective-scan extension builds while the first (Llama) job trains.
python -m longhorn_zoo.plugins.selective_scan.cuda --build >"$OUT/ext.log" 2>&1 & EXT=$!
for shape in $SHAPES; do
    seq=${shape%x*} mb=${shape#*x}
    for model in $MODELS; do
        if [[ $model != llama && -n ${EXT:-} ]]; then
            wait "$EXT" || { cat "$OUT/ext.log"; exit 1; }
            EXT=
        fi
        name=${model}_${seq}x${mb}
        rm -rf "${OUT:?}/$name"
        # shellcheck disable=SC2086
        NGPU=$NGPU ./run_train.sh "train_configs/${model}_1b.toml" --training.steps "$STEPS" \
            --training.seq_len "$seq" --training.local_batch_size "$mb" --training.global_batch_size -1 \
            --data.dataset bytes --checkpoint.enable false --compile.enable true --metrics.log_freq 5 \
            --metrics.enable_tensorboard false --metrics.enable_jsonl true --job.dump_folder "$OUT/$name" \
            ${EXTRA:-} >"$OUT/$name.log" 2>&1
        echo "$name: exit $? ($(grep -c '^step' "$OUT/$name.log") log lines)"
    done
done
python -m benchmarks.train_table "$OUT" --models "$MODELS" --shapes "$SHAPES" --ngpu "$NGPU" | tee "$OUT/table.md"
