"""Where a training step's time goes: forward, backward and the optimizer step (clipping included) of
minilm_sts's own step, outside Lightning, on the same batches `fit` trains on. Set beside the end-to-end time per
step (scripts/bench_end_to_end.py), the difference is what the framework, logging and data loading cost.

    python scripts/profile_step.py                         # packaged STS-B, 40 steps after 5 warm-up steps
    python scripts/profile_step.py --data quora/train.tsv

It also estimates the arithmetic done per step (6 x non-embedding parameters x real tokens, the usual rule for
a forward and backward pass), to compare with what the machine's matrix products reach. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin:stsb/train")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args()


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """What this process's fp32 matrix product reaches on square matrices, the ceiling for the projections."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def training_setup(data: str, batch_size: int, steps: int):
    """The model, fused AdamW and `steps` batches of `data` in the order fit would draw them, with the host
    memory setting that `fit` applies on a CPU."""
    from minilm_sts.data.pair_datasets import PairDataset
    from minilm_sts.data.token_cache import load_tokenized
    from minilm_sts.training.host_memory import reuse_freed_host_memory
    from minilm_sts.training.optimization import adamw
    from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

    reuse_freed_host_memory()  # as SentenceEncoderTraining.on_fit_start does on a CPU
    torch.manual_seed(0)
    model = SentenceEncoderTraining().train()
    dataset = PairDataset(load_tokenized(data, model.tokenizer, model.max_seq_length))
    optimizer = adamw(model.named_parameters(), 5e-5, 0.0, False, fused=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return model, optimizer, [dataset.collate(order[i * batch_size:][:batch_size]) for i in range(steps)]


def timed_step(model, optimizer, batch: dict) -> dict[str, float]:
    """One training step as fit runs it, in seconds per part: forward with the loss, backward, then clipping
    and the optimizer step."""
    from minilm_sts.training.losses import cosine_mse_loss

    started = time.perf_counter()
    u, v = model(batch["input_ids"], batch["lengths"]).chunk(2)
    loss = cosine_mse_loss(u, v, batch["labels"])
    forward_done = time.perf_counter()
    loss.backward()
    backward_done = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"forward": forward_done - started, "backward": backward_done - forward_done,
            "optimizer": time.perf_counter() - backward_done}


def main() -> None:
    args = parse_args()
    model, optimizer, batches = training_setup(args.data, args.batch_size, args.warmup + args.steps)
    parts = {"forward": [], "backward": [], "optimizer": []}
    tokens = []
    for step, batch in enumerate(batches):
        seconds = timed_step(model, optimizer, batch)
        if step >= args.warmup:
            for name, value in seconds.items():
                parts[name].append(value)
            tokens.append(int(batch["lengths"].sum()))
    embedding_parameters = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n or "pooler" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding_parameters
    step_seconds = sum(statistics.median(values) for values in parts.values())
    gflop = 6 * non_embedding * statistics.mean(tokens) / 1e9
    print(f"{args.data}: batch {args.batch_size}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"{statistics.mean(tokens):.0f} real tokens per step")
    print("| part | median s | share |\n|---|---|---|")
    for name, values in parts.items():
        print(f"| {name} | {statistics.median(values):.4f} | {statistics.median(values) / step_seconds:.0%} |")
    print(f"| step outside Lightning | {step_seconds:.4f} | |")
    print(f"\n{gflop:.2f} GFLOP per step: {gflop / step_seconds:.0f} GFLOP/s; this process's 1024x1024 fp32 "
          f"matrix product reaches {matmul_gflops():.0f} GFLOP/s.")


if __name__ == "__main__":
    main()
