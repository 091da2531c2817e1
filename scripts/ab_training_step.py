"""In-process A/B of the CPU training step against the variants it replaced: each variant runs the same batches
in blocks, alternating (A B, then B A) for several rounds, and reports its median seconds per step. This is
how the changes in docs/benchmarks.md ("What the matrix products leave, and what was kept") were measured.

    python scripts/ab_training_step.py                          # packaged STS-B, 8 rounds of 8 steps
    python scripts/ab_training_step.py --variants current,torch-dropout

Variants: `current` (as fit trains), `glibc-mmap` (glibc's default of mapping blocks over 32 MiB afresh, so the
word-embedding gradient page-faults every step), `torch-dropout` (torch's own CPU dropout for the hidden
states). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch.nn as nn
from profile_step import timed_step, training_setup  # beside this script

from minilm_sts.model import cpu_kernels
from minilm_sts.training import host_memory

GLIBC_DEFAULTS = {"M_MMAP_MAX": 65536, "M_TRIM_THRESHOLD": 128 * 1024}
CURRENT_DROPOUT = cpu_kernels.Dropout.forward


def set_variant(name: str) -> None:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    if name == "glibc-mmap":
        mallopt(host_memory.M_MMAP_MAX, GLIBC_DEFAULTS["M_MMAP_MAX"])
        mallopt(host_memory.M_TRIM_THRESHOLD, GLIBC_DEFAULTS["M_TRIM_THRESHOLD"])
    else:
        host_memory.reuse_freed_host_memory()
    cpu_kernels.Dropout.forward = nn.Dropout.forward if name == "torch-dropout" else CURRENT_DROPOUT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin:stsb/train")
    parser.add_argument("--variants", default="glibc-mmap,current,torch-dropout")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=8, help="steps per variant per round")
    args = parser.parse_args()
    names = args.variants.split(",")
    model, optimizer, batches = training_setup(args.data, 32, args.block)
    for name in names:  # warm-up
        set_variant(name)
        for batch in batches[:3]:
            timed_step(model, optimizer, batch)
    seconds = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            set_variant(name)
            started = time.perf_counter()
            for batch in batches:
                timed_step(model, optimizer, batch)
            seconds[name].append((time.perf_counter() - started) / len(batches))
    current = statistics.median(seconds.get("current", seconds[names[0]]))
    print(f"{args.data}, {args.rounds} rounds of {args.block} steps")
    print("| variant | median s/step | best | current's gain over it |\n|---|---|---|---|")
    for name in names:
        median = statistics.median(seconds[name])
        print(f"| {name} | {median:.4f} | {min(seconds[name]):.4f} | {median / current:.3f}x |")


if __name__ == "__main__":
    main()
