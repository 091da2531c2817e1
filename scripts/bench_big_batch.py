"""Large in-batch batches in bounded memory: one training step (forward, loss, backward, AdamW step) of mnrl on
the real weights at 32 to 4,096 pairs, cached (GradCache, `mini_batch_size`) and, where it fits, uncached. Prints
seconds per step, milliseconds per pair and each step's peak resident memory.

    flock /tmp/bench.lock python scripts/bench_big_batch.py [--batches 32 256 1024 4096] [--mini-batch-size 64]

Each setting runs in its own small process (this one imports no torch), so each peak is that setting's alone: the
model loaded, one untimed step of 32 pairs to warm up, then the timed step. Pairs are the first rows of the
packaged STS-B train split, fp32, the threads this machine has, as `fit` runs on a CPU. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024, 4096])
    parser.add_argument("--mini-batch-size", type=int, default=64, help="sentences per cached mini-batch")
    parser.add_argument("--uncached-up-to", type=int, default=1024,
                        help="also time plain mnrl up to this batch (its activations grow with the batch)")
    parser.add_argument("--one", nargs=2, type=int, metavar=("BATCH", "MINI_BATCH_SIZE"), help=argparse.SUPPRESS)
    return parser.parse_args()


def one_step(batch_size: int, mini_batch_size: int) -> dict:
    """Time and peak memory of one step at `batch_size` pairs (`mini_batch_size` 0: uncached), in this process."""
    import resource
    import time

    import torch

    from minilm_sts.data.pairs import read_pairs
    from minilm_sts.model.pretrained import DEFAULT_MODEL
    from minilm_sts.training.host_memory import reuse_freed_host_memory
    from minilm_sts.training.losses import build_loss
    from minilm_sts.training.optimization import adamw
    from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

    reuse_freed_host_memory()  # as fit does on a CPU
    table = read_pairs("builtin:stsb/train")
    module = SentenceEncoderTraining(pretrained=DEFAULT_MODEL).train()
    optimizer = adamw(module.named_parameters(), 5e-5, 0.0, False, True)
    loss = build_loss("mnrl", {"mini_batch_size": mini_batch_size})

    def step(rows: int) -> None:
        sentences = table.sentences_a[:rows] + table.sentences_b[:rows]
        batch = {**module.sentence_encoder.tokenize(sentences), "labels": torch.ones(rows), "columns": 2}
        module._step_loss(loss, batch, {}).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(32)
    started = time.perf_counter()
    step(batch_size)
    seconds = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"batch": batch_size, "mini_batch_size": mini_batch_size, "seconds": seconds,
            "ms_per_pair": 1000 * seconds / batch_size, "peak_gib": peak_gib}


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(one_step(*args.one)))
        return
    from minilm_sts.hardware import describe_machine, machine

    print(f"mnrl, one training step on {describe_machine(machine())}, fp32")
    print("| pairs per batch | mnrl | seconds per step | ms per pair | peak RSS (GiB) |\n|---|---|---|---|---|")
    for batch in args.batches:
        for mini_batch_size in [args.mini_batch_size] + ([0] if batch <= args.uncached_up_to else []):
            found = subprocess.run([sys.executable, __file__, "--one", str(batch), str(mini_batch_size)],
                                   capture_output=True, text=True, check=True)
            row = json.loads(found.stdout.strip().splitlines()[-1])
            kind = f"cached, mini-batches of {mini_batch_size} sentences" if mini_batch_size else "uncached"
            print(f"| {batch:,} | {kind} | {row['seconds']:.2f} | {row['ms_per_pair']:.1f} | "
                  f"{row['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
