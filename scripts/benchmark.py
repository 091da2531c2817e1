"""Measure minilm_sts against sentence-transformers on the same data, batch size, max length, precision,
threads and machine. Training steps and encode calls alternate between the two (A B A B ...) after a
warm-up, and each side reports the median of its steady-state steps. Prints a Markdown table and writes JSON.

    python scripts/benchmark.py                                   # packaged STS-B, a few minutes on 2 cores
    python scripts/benchmark.py --data ../shared/data/quora/train.tsv
    python scripts/benchmark.py --quick                           # under 2 minutes; never fails on slowness

It is a measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minilm_sts.hardware import describe_machine, machine

MAX_SEQ_LENGTH = 128
SEED_EPOCH_PAIRS = 489_640  # the seed model's training set


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin:stsb/train",
                        help="a pair file (default: the packaged STS-B train split)")
    parser.add_argument("--label-scale", type=float, default=1.0)
    parser.add_argument("--model", default=None, help="model id or folder for both sides (default: all-MiniLM-L6-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="alternations of the two trainers")
    parser.add_argument("--steps", type=int, default=5, help="training steps per side per round")
    parser.add_argument("--encode-sentences", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rss-steps", type=int, default=60, help="steps of the peak-memory fit runs (0: skip)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure minilm_sts with compile=True")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sentences: under 2 minutes")
    parser.add_argument("--json", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.encode_sentences, args.rss_steps = 4, 3, 512, 0
    return args


def model_path(name: str | None) -> str:
    from minilm_sts.model.pretrained import DEFAULT_MODEL, resolve_pretrained

    return str(resolve_pretrained(name or DEFAULT_MODEL))


def batch_plan(size: int, batch_size: int, count: int) -> list[list[int]]:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
    return [order[(i * batch_size) % size:][:batch_size] for i in range(count)]


class Trainee:
    """One side of the comparison: the same optimizer step (fused AdamW, clipping at 1.0, fp16 loss scaling
    when asked) around each side's own loss."""

    def __init__(self, model: torch.nn.Module, device: str, precision: str):
        self.model, self.device = model.to(device).train(), device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
        dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
        self.autocast = torch.autocast(device, dtype=dtype, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler(device, enabled=precision == "16-mixed")

    def step(self, indices: list[int]) -> None:
        with self.autocast:
            loss = self.loss(indices)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def encode(self, sentences: list[str], batch_size: int) -> None:
        self.model.encode(sentences, batch_size=batch_size)


class Ours(Trainee):
    def __init__(self, pairs, model: str, device: str, precision: str, compile: bool = False):
        from minilm_sts.data.pair_datasets import PairDataset
        from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

        super().__init__(SentenceEncoderTraining(pretrained=model, compile=compile), device, precision)
        self.name = "minilm_sts compiled" if compile else "minilm_sts"
        self.dataset = PairDataset(pairs)

    def loss(self, indices: list[int]) -> torch.Tensor:
        from minilm_sts.training.losses import cosine_mse_loss

        batch = {k: v.to(self.device) for k, v in self.dataset.collate(indices).items()}
        u, v = self.model(batch["input_ids"], batch["lengths"]).chunk(2)
        return cosine_mse_loss(u, v, batch["labels"])


class Reference(Trainee):
    name = "sentence-transformers"

    def __init__(self, table, model: str, device: str, precision: str):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

        model = SentenceTransformer(model, device=device)
        model.max_seq_length = MAX_SEQ_LENGTH
        super().__init__(model, device, precision)
        self.criterion = CosineSimilarityLoss(model)
        self.table = table

    def loss(self, indices: list[int]) -> torch.Tensor:
        # Tokenizing both columns is part of each step, as in the reference's data collator.
        a = [self.table.sentences_a[i] for i in indices]
        b = [self.table.sentences_b[i] for i in indices]
        labels = torch.tensor([self.table.labels[i] for i in indices], device=self.device)
        features = [{k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in self.model.preprocess(column).items()}
                    for column in (a, b)]
        return self.criterion(features, labels)


def alternate(sides, work, rounds: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of `work(side)` for each side, alternating sides each round, after a warm-up
    round; and each side's total seconds in that warm-up round (where compilation happens)."""
    times = {side.name: [] for side in sides}
    warmup = {side.name: 0.0 for side in sides}
    for round_index in range(rounds + 1):
        for side in sides:
            for _ in range(repeats):
                started = time.perf_counter()
                work(side)
                if round_index:
                    times[side.name].append(time.perf_counter() - started)
                else:
                    warmup[side.name] += time.perf_counter() - started
    return {name: statistics.median(values) for name, values in times.items()}, warmup


def peak_gpu_memory(sides, plan: list[list[int]]) -> dict[str, float]:
    """Peak GPU memory of each side over the same steps, measured one side at a time."""
    peaks = {}
    for side in sides:
        torch.cuda.reset_peak_memory_stats()
        for indices in plan:
            side.step(indices)
        peaks[side.name] = torch.cuda.max_memory_allocated() / 2**30
    return peaks


def padding_stats(table, pairs, plan) -> dict[str, float]:
    """Per batch: real tokens, what the reference computes (each column padded to its longest), and the
    attention blocks minilm_sts pads for (sentences in groups of similar length, each padded to its longest)."""
    from minilm_sts.model.bert import PackedLayout

    real, reference, attention = [], [], []
    for indices in plan:
        lengths_a = [len(pairs.sentence(2 * i)) for i in indices]
        lengths_b = [len(pairs.sentence(2 * i + 1)) for i in indices]
        real.append(sum(lengths_a) + sum(lengths_b))
        reference.append(len(indices) * (max(lengths_a) + max(lengths_b)))
        groups = PackedLayout(torch.tensor(lengths_a + lengths_b)).groups
        attention.append(sum(count * width for _, count, width, _ in groups))
    return {"real_tokens_per_batch": float(np.mean(real)),
            "reference_padded_tokens_per_batch": float(np.mean(reference)),
            "attention_block_tokens_per_batch": float(np.mean(attention))}


def tokenization_cost(source: str, label_scale: float, tokenizer) -> dict[str, float]:
    from minilm_sts.data.token_cache import load_tokenized

    with tempfile.TemporaryDirectory() as cache:
        os.environ["MINILM_STS_CACHE"] = cache
        started = time.perf_counter()
        load_tokenized(source, tokenizer, MAX_SEQ_LENGTH, label_scale=label_scale)
        first = time.perf_counter() - started
        started = time.perf_counter()
        pairs = load_tokenized(source, tokenizer, MAX_SEQ_LENGTH, label_scale=label_scale)
        cached = time.perf_counter() - started
        pairs = type(pairs)(**{k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in vars(pairs).items()})
    os.environ.pop("MINILM_STS_CACHE")
    return {"tokenize_seconds": first, "cached_reload_seconds": cached}, pairs


def peak_rss_gib(side: str, args) -> float:
    """Peak resident memory of a separate process training `args.rss_steps` steps."""
    command = [sys.executable, __file__, "--child", side, "--data", args.data, "--label-scale", str(args.label_scale),
               "--rss-steps", str(args.rss_steps), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--model", model_path(args.model)]
    # The child reports its own high-water mark: getrusage's ru_maxrss of a child would start from this large
    # parent's size at fork time.
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the peak-memory run failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    kilobytes = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    return kilobytes / 2**20


def child(args) -> None:
    """The process `peak_rss_gib` measures: the fit subcommand for ours, a training loop for the reference."""
    train_in_child(args)
    peak = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")]
    print("PEAK_RSS_KB", peak[0].split()[1])


def train_in_child(args) -> None:
    if args.child == "ours":
        from minilm_sts.cli.commands import main

        main(["fit", "--model.pretrained", model_path(args.model), "--data.train_path", args.data,
              "--data.label_scale", str(args.label_scale),
              "--data.val_path", "builtin:stsb/dev", "--data.test_path", "null",
              "--data.batch_size", str(args.batch_size),
              "--trainer.max_steps", str(args.rss_steps), "--trainer.val_check_interval", str(args.rss_steps),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", tempfile.mkdtemp(), "--trainer.num_sanity_val_steps", "0"])
        return
    from minilm_sts.data.pairs import read_pairs

    table = read_pairs(args.data, label_scale=args.label_scale)
    reference = Reference(table, model_path(args.model), args.device, args.precision)
    for indices in batch_plan(len(table), args.batch_size, args.rss_steps):
        reference.step(indices)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    from transformers import AutoTokenizer

    from minilm_sts.data.pairs import read_pairs

    model = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    costs, pairs = tokenization_cost(args.data, args.label_scale, tokenizer)
    table = read_pairs(args.data, label_scale=args.label_scale)
    ours, reference = (Ours(pairs, model, args.device, args.precision),
                       Reference(table, model, args.device, args.precision))
    sides = [reference, ours] + ([Ours(pairs, model, args.device, args.precision, compile=True)]
                                 if args.compile else [])
    plan = iter(batch_plan(len(table), args.batch_size, (args.rounds + 1) * args.steps * len(sides)))
    step_seconds, warmup_seconds = alternate(sides, lambda side: side.step(next(plan)), args.rounds, args.steps)
    stats = padding_stats(table, pairs, batch_plan(len(table), args.batch_size, 200))
    sentences = list(dict.fromkeys(table.sentences_a + table.sentences_b))[: args.encode_sentences]
    encode = {}
    for batch_size in () if args.skip_encode else (32, 128):
        seconds, _ = alternate(sides, lambda side: side.encode(sentences, batch_size), rounds=3, repeats=1)
        encode[batch_size] = {name: len(sentences) / s for name, s in seconds.items()}
    result = {
        "data": args.data, "pairs": len(table), "batch_size": args.batch_size, "threads": args.threads,
        "device": args.device, "precision": args.precision,
        "seed_epoch_minutes": {name: SEED_EPOCH_PAIRS / args.batch_size * s / 60 for name, s in step_seconds.items()},
        "peak_gpu_memory_gib": peak_gpu_memory(sides, batch_plan(len(table), args.batch_size, args.steps))
                              if args.device == "cuda" else {},
        "train_steps_measured": args.rounds * args.steps, "rss_steps": args.rss_steps,
        "steps_per_round": args.steps, "warmup_round_seconds": warmup_seconds,
        "train_pairs_per_sec": {name: args.batch_size / s for name, s in step_seconds.items()},
        "train_tokens_per_sec": {name: stats["real_tokens_per_batch"] / s for name, s in step_seconds.items()},
        "encode_sentences_per_sec": encode, **stats, **costs,
        "peak_rss_gib": {side.name: peak_rss_gib(key, args) for key, side in (("reference", reference), ("ours", ours))}
        if args.rss_steps else {},
        "versions": versions(), "machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


def versions() -> dict[str, str]:
    import sentence_transformers

    from minilm_sts.training.callbacks.run_record import framework_versions

    return {**framework_versions(), "sentence-transformers": sentence_transformers.__version__}


def markdown(r: dict) -> str:
    ref = "sentence-transformers"
    ours = [name for name in r["train_pairs_per_sec"] if name != ref]
    rows = [("training pairs/s", r["train_pairs_per_sec"], ".1f"),
            ("training real tokens/s", r["train_tokens_per_sec"], ".0f"),
            (f"projected {SEED_EPOCH_PAIRS:,}-pair epoch, minutes", r["seed_epoch_minutes"], ".1f")]
    rows += [(f"encode sentences/s, batch {size}", values, ".1f")
             for size, values in r["encode_sentences_per_sec"].items()]
    if r["peak_rss_gib"]:
        rows.append((f"peak RSS of a {r['rss_steps']}-step training run, GiB", r["peak_rss_gib"], ".2f"))
    if r["peak_gpu_memory_gib"]:
        rows.append(("peak GPU memory, GiB", r["peak_gpu_memory_gib"], ".2f"))
    rows.append((f"warm-up: first {r['steps_per_round']} steps (compilation included), s",
                 r["warmup_round_seconds"], ".1f"))
    lines = [f"Machine: {describe_machine(r['machine'])}.", "",
             f"Data: `{r['data']}` ({r['pairs']:,} pairs), batch {r['batch_size']}, max length {MAX_SEQ_LENGTH}, "
             f"{r['device']}, precision {r['precision']}, {r['threads']} threads, {r['train_steps_measured']} measured "
             "steps per side.", "", "| measure | " + " | ".join([ref] + [f"{name} | ratio" for name in ours]) + " |",
             "|---|---|" + "---|---|" * len(ours)]
    lines += [f"| {name} | {v[ref]:{fmt}} | "
              + " | ".join(f"{v[side]:{fmt}} | {v[side] / v[ref]:.2f}x" for side in ours if side in v)
              + " |" for name, v, fmt in rows]
    lines += ["", "| tokens per batch | |", "|---|---|",
              f"| real (what minilm_sts's projections and feed-forward compute) | {r['real_tokens_per_batch']:.0f} |",
              "| sentence-transformers (each column padded to its longest) | "
              f"{r['reference_padded_tokens_per_batch']:.0f} |",
              "| minilm_sts attention blocks (padded only inside attention, by length group) | "
              f"{r['attention_block_tokens_per_batch']:.0f} |",
              "", f"Tokenizing the dataset once: {r['tokenize_seconds']:.1f} s; reloading it from the cache: "
              f"{r['cached_reload_seconds']:.2f} s.", "",
              f"Measured {r['date']} with `python {r['command']}`; "
              + ", ".join(f"{name} {version}" for name, version in r["versions"].items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
