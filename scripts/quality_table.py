"""Does fine-tuning help? The table of docs/quality.md: each recipe trained on Quora through the command line, as a
user runs it, then every model scored the same way.

Rows: the base model (no training); the seed's card recipe and its `fit()` recipe on Quora duplicates with
random negatives (the seed's kind of data); configs/duplicates.yaml on Quora with its hard negatives, with one
run per seed. Every run takes the same number of steps and is scored at its last step (no checkpoint selection,
so the dev set used for scoring chose nothing).

Columns: duplicate retrieval over the first `--dev-rows` rows of Quora dev (MRR@10, accuracy@1 (at least one
duplicate ranked first; what the issue called Recall@1), recall@1, average precision of cosine on the same
pairs) and STS-B test Spearman, which shows what training cost general similarity.

    python scripts/quality_table.py --quora DIR --quora-dup-random DIR --output docs/quality.md

DIR holds train.tsv and dev.tsv (sentence_0, sentence_1, label). Runs go to --work (kept, so a rerun reuses a
finished run's last checkpoint); raw numbers go beside the output as .json. In the output, only the part
between the table's markers is replaced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minilm_sts import SentenceEncoder, load
from minilm_sts.data.pairs import read_pairs
from minilm_sts.evaluation.binary import binary_classification
from minilm_sts.evaluation.correlations import correlations
from minilm_sts.evaluation.retrieval import DuplicateRetrieval
from minilm_sts.hardware import cpu_has_native_bf16, describe_machine, machine
from minilm_sts.model.pretrained import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"cosine_mrr@10": "Quora MRR@10", "cosine_accuracy@1": "Quora Accuracy@1",
           "cosine_recall@1": "Quora Recall@1", "cosine_ap": "Quora AP", "stsb_test_spearman": "STS-B test Spearman"}


@dataclass(frozen=True)
class Recipe:
    name: str
    config: str | None  # None: the base model, untrained
    data: str  # the training data, as the table states it
    train_path: str = ""  # --data.train_path, with {quora} and {dup_random} standing for the train files
    seeds: tuple[int, ...] = (42,)


def recipes(seeds: tuple[int, ...]) -> list[Recipe]:
    seed_data = "Quora duplicates + random negatives"
    return [
        Recipe("base (no training)", None, "-"),
        Recipe("seed card recipe (`configs/stackexchange.yaml`)", "configs/stackexchange.yaml", seed_data,
               "{dup_random}"),
        Recipe("seed `fit()` recipe (`configs/stackexchange_fit.yaml`)", "configs/stackexchange_fit.yaml", seed_data,
               "{dup_random}"),
        Recipe("ours (`configs/duplicates.yaml`)", "configs/duplicates.yaml", "Quora (hard negatives) + STS-B train",
               "{{duplicates: {quora}, stsb: builtin:stsb/train}}", seeds),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quora", type=Path, required=True, help="folder with Quora train.tsv and dev.tsv")
    parser.add_argument("--quora-dup-random", type=Path, required=True,
                        help="folder with train.tsv of Quora duplicates plus random negatives")
    parser.add_argument("--dev-rows", type=int, default=5000, help="score on the first N rows of Quora dev")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run (at most 2000 here)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="seeds of our recipe's runs")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "quality.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dev = args.work / f"quora_dev_first{args.dev_rows}.tsv"
    dev.write_text("".join(open(args.quora / "dev.tsv", encoding="utf-8").readlines()[: args.dev_rows + 1]),
                   encoding="utf-8")
    score = Scorer(dev)
    train_files = {"quora": args.quora / "train.tsv", "dup_random": args.quora_dup_random / "train.tsv"}
    results = []
    for recipe in recipes(tuple(args.seeds)):
        for seed in recipe.seeds:
            started = time.time()
            if recipe.config is None:
                model = SentenceEncoder.from_pretrained(DEFAULT_MODEL)
            else:
                model = load(train(recipe, seed, recipe.train_path.format(**train_files), dev, args.steps, args.work))
            results.append({"recipe": recipe.name, "data": recipe.data, "seed": seed, **score(model)})
            print(f"{recipe.name} seed {seed}: {results[-1]} ({time.time() - started:.0f} s)", file=sys.stderr)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(args.output, render(results, args, len(score.retrieval.corpus)))


def train(recipe: Recipe, seed: int, train_path: str, dev: Path, steps: int, work: Path) -> Path:
    """Fit through the command line, validating only at the end (the dev rows, also as retrieval, under the name
    the duplicates recipe gives them); returns the last checkpoint."""
    run_dir = work / f"{Path(recipe.config).stem}-seed{seed}-{steps}steps"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and (run_dir / "finished").is_file():
        return last
    command = [sys.executable, "-m", "minilm_sts", "fit", "--config", str(ROOT / recipe.config),
               "--seed_everything", str(seed), "--data.train_path", train_path,
               "--data.val_path", f"{{duplicates: {dev}}}", "--data.retrieval", "[duplicates]",
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.logger", "false", "--trainer.default_root_dir", str(run_dir)]
    subprocess.run(command, check=True, cwd=ROOT)
    (run_dir / "finished").touch()
    return last


class Scorer:
    """Every model scored by the same code: retrieval and AP on the Quora dev rows, Spearman on STS-B test."""

    def __init__(self, dev: Path):
        self.dev = read_pairs(str(dev))
        self.retrieval = DuplicateRetrieval.from_pairs(self.dev.sentences_a, self.dev.sentences_b, self.dev.labels)
        self.stsb = read_pairs("builtin:stsb/test")

    def __call__(self, model: SentenceEncoder) -> dict[str, float]:
        started = time.perf_counter()
        retrieval = self.retrieval.evaluate(model.encode)
        seconds = time.perf_counter() - started
        quora = binary_classification(pair_cosine(model, self.dev), torch.tensor(self.dev.labels))
        stsb = correlations(pair_cosine(model, self.stsb), torch.tensor(self.stsb.labels))
        return {**{k: retrieval[k] for k in ("cosine_mrr@10", "cosine_accuracy@1", "cosine_recall@1")},
                "cosine_ap": quora["cosine_ap"], "stsb_test_spearman": stsb["spearman_cosine"],
                "retrieval_seconds": seconds}


def pair_cosine(model: SentenceEncoder, table) -> torch.Tensor:
    return F.cosine_similarity(model.encode(table.sentences_a), model.encode(table.sentences_b))


def render(results: list[dict], args: argparse.Namespace, corpus: int) -> str:
    """A row per run, and for a recipe run with several seeds a row of their mean and spread (max - min)."""
    header = ["Recipe", "Trained on", "Seed", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == name]
        for r in runs:
            seed = str(r["seed"]) if r["data"] != "-" else "-"
            lines.append("| " + " | ".join([name, r["data"], seed, *(f"{r[key]:.4f}" for key in COLUMNS)]) + " |")
        if len(runs) > 1:
            cells = [f"**{statistics.mean(v):.4f}** (spread {max(v) - min(v):.4f})"
                     for v in ([r[key] for r in runs] for key in COLUMNS)]
            lines.append("| " + " | ".join([f"**{name}, mean**", runs[0]["data"], "all", *cells]) + " |")
    # The data folders by name only: their place is the reader's own, not this machine's.
    command = (f"python scripts/quality_table.py --quora {args.quora.name} "
               f"--quora-dup-random {args.quora_dup_random.name} --dev-rows {args.dev_rows} --steps {args.steps} "
               f"--seeds {' '.join(map(str, args.seeds))}")
    seconds = statistics.median(r["retrieval_seconds"] for r in results)
    precision = "bf16-mixed" if cpu_has_native_bf16() else "32-true"  # what the recipes' 16-mixed becomes here
    return (f"{TABLE_START}\nMeasured {time.strftime('%Y-%m-%d')} with torch {torch.__version__} on "
            f"{describe_machine(machine())}: {args.steps} steps per run, trained in {precision} (what the "
            f"recipes' 16-mixed becomes on this CPU), scored in fp32. Retrieval over the {corpus:,} dev sentences took "
            f"{seconds:.0f} s per model (median). Made by\n\n    {command}\n\n" + "\n".join(lines) + f"\n{TABLE_END}")


def write_table(path: Path, table: str) -> None:
    """Replace the table between its markers and keep the prose around it; a new file holds just the table."""
    text = path.read_text() if path.is_file() else ""
    if TABLE_START in text and TABLE_END in text:
        before, rest = text.split(TABLE_START, 1)
        text = before + table + rest.split(TABLE_END, 1)[1]
    else:
        text = table + "\n"
    path.write_text(text)


TABLE_START, TABLE_END = "<!-- quality table: written by scripts/quality_table.py -->", "<!-- end of quality table -->"

if __name__ == "__main__":
    main()
