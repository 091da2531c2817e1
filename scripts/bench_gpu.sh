#!/usr/bin/env bash
# The GPU benchmark, as one prepared script (about 5 minutes on one H100/H200): the seed recipe's training step
# (batch 32, max length 128, fp16 mixed precision, fused AdamW, clipping at 1.0) on Quora duplicate pairs, for
# minilm_sts and sentence-transformers alternately. Reports steps/s, pairs/s, the projected time of a
# 489,640-pair epoch and peak GPU memory. Needs no network and no wandb.
#
#   bash scripts/bench_gpu.sh [DATA]      # DATA defaults to .bench/quora_dup_random_train.tsv (copy it in first:
#                                         # the GPU machine sees only the working tree)
#   DRY_RUN=1 bash scripts/bench_gpu.sh   # a few steps on the CPU, to check the script before spending GPU time
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-.bench/quora_dup_random_train.tsv}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exec python scripts/benchmark.py --data "$DATA" --device cpu --precision 32 --rounds 1 --steps 2 \
        --skip-encode --rss-steps 0 --compile --json "${OUT:-.}/bench_gpu_dry.json"
fi
python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
python scripts/benchmark.py --data "$DATA" --device cuda --precision 16-mixed --rounds 10 --steps 100 \
    --encode-sentences 20000 --rss-steps 0 --threads 16 --compile --json "${OUT:-.}/bench_gpu.json"
