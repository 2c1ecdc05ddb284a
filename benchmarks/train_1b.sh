#!/usr/bin/env bash
# Short 1.3B training jobs (Llama, then Longhorn) for the throughput/MFU/memory table of
# docs/benchmarks.md. Run on a GPU machine from the repo root: `bash benchmarks/train_1b.sh [OUT]`.
# NGPU=2 or 4 runs the same jobs with FSDP2 across that many GPUs (scaling efficiency).
# The log lines give tokens/s per device, MFU and peak memory; the Longhorn line says which
# scan backend ran (the CUDA extension is built first, in the background, while Llama trains).
set -euo pipefail
OUT=${1:-outputs/train_1b}
NGPU=${NGPU:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/info.txt"
python -m longhorn_zoo.plugins.selective_scan.cuda --build >"$OUT/ext.log" 2>&1 & EXT=$!
# The embedded byte corpus stands in for the prepared SlimPajama shards (throughput does not
# depend on the text); one micro-batch per step.
COMMON=(--training.steps 20 --training.global_batch_size -1 --data.dataset bytes --checkpoint.enable false
        --compile.enable true --metrics.log_freq 5 --metrics.enable_tensorboard false --metrics.enable_jsonl true)
NGPU=$NGPU ./run_train.sh train_configs/llama_1b.toml "${COMMON[@]}" --training.local_batch_size 8 \
    --job.dump_folder "$OUT/llama" 2>&1 | tee "$OUT/llama.log"
wait $EXT; cat "$OUT/ext.log"
python -c "from longhorn_zoo.plugins.longhorn.ops import longhorn_scan as o; b = o.select_backend('cuda'); \
print('longhorn op backend:', b.name if b else 'reference')" | tee -a "$OUT/info.txt"
NGPU=$NGPU ./run_train.sh train_configs/longhorn_1b.toml "${COMMON[@]}" --training.local_batch_size 4 \
    --job.dump_folder "$OUT/longhorn" 2>&1 | tee "$OUT/longhorn.log"
