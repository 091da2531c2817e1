"""What a sentence-transformers user runs instead of `python -m minilm_sts fit`: `SentenceTransformerTrainer`
with `CosineSimilarityLoss` on a pair file, validated by `EmbeddingSimilarityEvaluator` once at the end. The
end-to-end benchmark (`scripts/bench_end_to_end.py`) times this script as a whole process. It needs the
benchmark extra (`pip install -e ".[bench]"`: sentence-transformers, datasets, accelerate).

    python scripts/st_trainer_fit.py --train pairs.tsv --val dev.tsv --steps 100 --precision 32

It prints one line `RESULT {json}` with the last training loss and the validation correlations.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import tempfile
from pathlib import Path


def read_pairs(path: Path, label_scale: float) -> dict[str, list]:
    """A header-first TSV or CSV (optionally gzipped) with two sentence columns and a label column."""
    opener = gzip.open if path.suffix == ".gz" else open
    delimiter = "," if ".csv" in path.suffixes else "\t"
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    header, rows = rows[0], rows[1:]
    first, second = [c for c in header if c not in ("label", "score")][:2]
    label = "label" if "label" in header else "score"
    column = {name: header.index(name) for name in (first, second, label)}
    return {"sentence1": [r[column[first]] for r in rows], "sentence2": [r[column[second]] for r in rows],
            "score": [float(r[column[label]]) / label_scale for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a sentence-transformers model folder")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--label-scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--precision", choices=["32", "16-mixed", "bf16-mixed"], default="32")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    model = SentenceTransformer(args.model)
    model.max_seq_length = 128
    val = read_pairs(args.val, args.label_scale)
    evaluator = EmbeddingSimilarityEvaluator(val["sentence1"], val["sentence2"], val["score"], name="val")
    training = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.0,
        optim="adamw_torch_fused", max_grad_norm=1.0, fp16=args.precision == "16-mixed",
        bf16=args.precision == "bf16-mixed", eval_strategy="steps", eval_steps=args.steps,
        save_strategy="no", logging_steps=min(10, args.steps), report_to="none", seed=42,
        use_cpu=not torch.cuda.is_available())  # without it, bf16 on a CPU is refused
    trainer = SentenceTransformerTrainer(
        model=model, args=training, train_dataset=Dataset.from_dict(read_pairs(args.train, args.label_scale)),
        loss=CosineSimilarityLoss(model), evaluator=evaluator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evaluation = next(entry for entry in reversed(trainer.state.log_history) if "eval_val_spearman_cosine" in entry)
    result = {"steps": trainer.state.global_step, "last_loss": losses[-1] if losses else math.nan,
              "val_pearson": evaluation["eval_val_pearson_cosine"],
              "val_spearman": evaluation["eval_val_spearman_cosine"]}
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()
