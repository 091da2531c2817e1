"""The training loader alone: batches per second that `PairDataModule` delivers from its token cache, through
the real batch plan and collate (the layout included), with 0, 1 and 2 worker processes, for each path's
layout (packed on a CPU, a padding plan under `compile`). A GPU step of ~2 ms needs 500 batches a second; the
target is 5x that, so that the loader never sets the pace.

    python scripts/bench_loader.py --train ../shared/data/quora_dup_random/train.tsv --pairs 64000

The first pass over the file fills the token cache (untimed). Each setting then times whole passes over its
batches, after one batch to start its workers, and reports the best of `--rounds`. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import lightning as L

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.hardware import describe_machine, machine
from minilm_sts.model.bert import PackedLayout, PaddingPlan
from minilm_sts.model.pretrained import DEFAULT_MODEL, resolve_pretrained
from minilm_sts.model.sentence_encoder import COMPILED_WIDTH_MULTIPLE
from minilm_sts.model.tokenization import load_tokenizer

TARGET = 5 * 500  # batches/s: five times the rate of a 2 ms step
LAYOUTS = {"packed": PackedLayout,
           "padding plan": functools.partial(PaddingPlan, width_multiple=COMPILED_WIDTH_MULTIPLE)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="a pair file")
    parser.add_argument("--pairs", type=int, default=64_000, help="the file's first rows, copied to a temporary file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench_loader.json"))
    return parser.parse_args()


def first_rows(source: Path, rows: int, folder: Path) -> Path:
    target = folder / f"first_{rows}{source.suffix}"
    with source.open() as lines, target.open("w") as out:
        out.writelines(islice(lines, rows + 1))  # the header, then the rows
    return target


def batches_per_second(train: Path, batch_size: int, workers: int, layout, tokenizer) -> tuple[float, int]:
    """Best-effort steady rate of one pass: the clock starts after the first batch, once workers run."""
    data = PairDataModule(str(train), str(train), batch_size=batch_size, num_workers=workers, forgetting_guard=False)
    data.tokenize_with(tokenizer, 128, batch_layout=layout)
    data.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    next(batches)
    started, count = time.perf_counter(), 0
    for _ in batches:
        count += 1
    return count / (time.perf_counter() - started), count


def main() -> None:
    args = parse_args()
    tokenizer = load_tokenizer(resolve_pretrained(DEFAULT_MODEL))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        train = first_rows(Path(args.train), args.pairs, Path(folder))
        batches_per_second(train, args.batch_size, 0, PackedLayout, tokenizer)  # fills the token cache
        for name, layout in LAYOUTS.items():
            for workers in args.workers:
                rates = [batches_per_second(train, args.batch_size, workers, layout, tokenizer)
                         for _ in range(args.rounds)]
                best = max(rate for rate, _ in rates)
                rows.append({"layout": name, "workers": workers, "batches": rates[0][1], "batches_per_s": best,
                             "vs_target": best / TARGET})
    print(f"\nMachine: {describe_machine(machine())}\n")
    print(f"| loader, batch {args.batch_size}, {args.pairs:,} pairs | workers | batches/s | vs {TARGET:,}/s |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['layout']} | {row['workers']} | {row['batches_per_s']:,.0f} | {row['vs_target']:.2f}x |")
    args.json.write_text(json.dumps({"machine": machine(), "args": {**vars(args), "json": str(args.json)},
                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
