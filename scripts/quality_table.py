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
import csv
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
    train_path: str = ""  # --data.train_path, with {quora}, {dup_random}, {mined}, {mined_unmasked} for the files
    seeds: tuple[int, ...] = (42,)
    overrides: tuple[str, ...] = ()  # further command-line arguments of the run
    batch_size: int = 32  # a larger batch trains on the same number of pairs in proportionally fewer steps
    run_name: str = ""  # the run folder's name, where several recipes share a config

    def steps(self, pairs_budget_steps: int) -> int:
        return pairs_budget_steps * 32 // self.batch_size


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
        *mined_recipes(seeds),
    ]


MINED_CONFIG = "configs/duplicates_mined.yaml"
MINED_DATA = "Quora mined triplets{} + STS-B train"


def mined_recipes(seeds: tuple[int, ...]) -> list[Recipe]:
    """The recipe with mined hard negatives, and the variants that test each of its parts."""
    masked = "{{duplicates: {mined}, stsb: builtin:stsb/train}}"
    return [
        Recipe(f"mined negatives (`{MINED_CONFIG}`)", MINED_CONFIG, MINED_DATA.format(""), masked, seeds),
        Recipe("mined negatives, no cluster masking", MINED_CONFIG, MINED_DATA.format(" (mined unmasked)"),
               "{{duplicates: {mined_unmasked}, stsb: builtin:stsb/train}}",
               overrides=("--model.loss_params", "{duplicates: {mask_known_duplicates: false}}"),
               run_name="mined-unmasked"),
        Recipe("mined negatives, batch 256 (GradCache, mini-batch 32)", MINED_CONFIG, MINED_DATA.format(""), masked,
               overrides=("--model.loss_params", "{duplicates: {mask_known_duplicates: true, mini_batch_size: 32}}"),
               batch_size=256, run_name="mined-batch256"),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quora", type=Path, required=True, help="folder with Quora train.tsv and dev.tsv")
    parser.add_argument("--quora-dup-random", type=Path, required=True,
                        help="folder with train.tsv of Quora duplicates plus random negatives")
    parser.add_argument("--dev-rows", type=int, default=5000, help="score on the first N rows of Quora dev")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run (at most 2000 here)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="seeds of our recipe's runs")
    parser.add_argument("--mine-positives", type=int, default=40000,
                        help="mine negatives for the first N positive pairs of Quora train, among the sentences of "
                             "the train rows up to the last of them")
    parser.add_argument("--retrain", nargs="*", default=None, metavar="RECIPE",
                        help="train and score only these recipes (by name, as in the table), keep the other rows "
                             "of the existing .json and leave out recipes it lacks; by default every recipe is trained")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "quality.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dev_lines = open(args.quora / "dev.tsv", encoding="utf-8").readlines()
    dev = args.work / f"quora_dev_first{args.dev_rows}.tsv"
    dev.write_text("".join(dev_lines[: args.dev_rows + 1]), encoding="utf-8")
    # The runs validate (and a merge chooses its α) on the next rows, so that the scored rows choose nothing.
    selection = args.work / f"quora_dev_next{args.dev_rows}.tsv"
    selection.write_text("".join(dev_lines[:1] + dev_lines[args.dev_rows + 1 : 2 * args.dev_rows + 1]),
                         encoding="utf-8")
    score = Scorer(dev)
    kept = kept_results(args.output.with_suffix(".json"), args.retrain)
    results = []
    for recipe in recipes(tuple(args.seeds)):
        for seed in recipe.seeds:
            if args.retrain is not None and recipe.name not in args.retrain:
                names = (before_merge(recipe.name), recipe.name)
                results += [kept[name, seed] for name in names if (name, seed) in kept]
                continue
            started = time.time()
            run = {"data": recipe.data, "seed": seed, "measured": time.strftime("%Y-%m-%d"),
                   "steps": recipe.steps(args.steps) if recipe.config else 0, "batch_size": recipe.batch_size}
            if recipe.config is None:
                model = SentenceEncoder.from_pretrained(DEFAULT_MODEL)
            else:
                train_path = recipe.train_path.format(**train_files(args, recipe))
                made = train(recipe, seed, train_path, selection, args.steps, args.work)
                if made.name != "last.ckpt":  # what the merge changed: the fine-tuned model, scored alike
                    before = load(made.parent / "last.ckpt")
                    results.append({"recipe": before_merge(recipe.name), **run, "alpha": 1.0, **score(before)})
                    run["alpha"] = float(made.stem.removeprefix("merged-alpha"))
                model = load(made)
            results.append({"recipe": recipe.name, **run, **score(model)})
            print(f"{recipe.name} seed {seed}: {results[-1]} ({time.time() - started:.0f} s)", file=sys.stderr)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(args.output, render(results, args, len(score.retrieval.corpus)))


def before_merge(name: str) -> str:
    return f"{name}, before the merge"


def kept_results(path: Path, retrain: list[str] | None) -> dict[tuple[str, int], dict]:
    """The rows of an earlier table to keep, by (recipe, seed): all but the --retrain recipes' (and their rows
    before the merge) when that is given."""
    if retrain is None or not path.is_file():
        return {}
    return {(r["recipe"], r["seed"]): r for r in json.loads(path.read_text())
            if not any(r["recipe"] in (name, before_merge(name)) for name in retrain)}


def train_files(args: argparse.Namespace, recipe: Recipe) -> dict[str, Path]:
    """The files `recipe.train_path` names, mining the triplets it needs (once: later runs reuse them)."""
    files = {"quora": args.quora / "train.tsv", "dup_random": args.quora_dup_random / "train.tsv"}
    for name, masked in (("mined", True), ("mined_unmasked", False)):
        if f"{{{name}}}" in recipe.train_path:
            files[name] = mined_triplets(args.quora / "train.tsv", args.mine_positives, args.work, masked)
    return files


def mined_triplets(train: Path, positives: int, work: Path, cluster_masking: bool) -> Path:
    """Hard negatives for the first `positives` positive pairs of `train`, mined by the base model through the
    command line, with or without cluster masking: 3 negatives each at a relative margin of 0.05 (NV-Retriever's
    setting), of which the recipes train on the first, the hardest. Kept in `work`."""
    anchors, corpus = work / f"quora_train_first{positives}_positives.tsv", work / f"quora_train_corpus{positives}.txt"
    if not anchors.is_file():
        write_mining_inputs(train, positives, anchors, corpus)
    name = "mined" if cluster_masking else "mined_unmasked"
    three, one = work / f"{name}{positives}_3neg.tsv", work / f"{name}{positives}.tsv"
    if not three.is_file():
        subprocess.run([sys.executable, "-m", "minilm_sts", "mine-negatives", str(anchors), "--corpus", str(corpus),
                        "--output", str(three), "--num-negatives", "3", "--relative-margin", "0.05",
                        "--batch-size", "128", *([] if cluster_masking else ["--no-cluster-masking"])],
                       check=True, cwd=ROOT)
    if not one.is_file():
        keep_first_negative(three, one)
    return one


def keep_first_negative(mined: Path, triplets: Path) -> None:
    with open(mined, encoding="utf-8", newline="") as source, open(triplets, "w", encoding="utf-8", newline="") as out:
        rows = csv.reader(source, delimiter="\t")
        next(rows)
        csv.writer(out, delimiter="\t").writerows([["anchor", "positive", "negative"], *(row[:3] for row in rows)])


def write_mining_inputs(train: Path, positives: int, anchors: Path, corpus: Path) -> None:
    """The first `positives` rows labelled 1.0 of `train`, and every distinct sentence of the rows up to the last."""
    kept, sentences = [], {}
    with open(train, encoding="utf-8", newline="") as source:
        for row in csv.DictReader(source, delimiter="\t"):
            sentences.setdefault(row["sentence_0"])
            sentences.setdefault(row["sentence_1"])
            if row["label"] == "1.0":
                kept.append([row["sentence_0"], row["sentence_1"], "1.0"])
                if len(kept) == positives:
                    break
    with open(anchors, "w", encoding="utf-8", newline="") as out:
        csv.writer(out, delimiter="\t").writerows([["sentence_0", "sentence_1", "label"], *kept])
    corpus.write_text("".join(f"{sentence}\n" for sentence in sentences), encoding="utf-8")


def train(recipe: Recipe, seed: int, train_path: str, selection: Path, budget_steps: int, work: Path) -> Path:
    """Fit through the command line, validating only at the end (the selection rows, also as retrieval, under the
    name the duplicates recipe gives them, and STS-B dev where the run trains on STS-B, which turns the automatic
    forgetting guard off); returns the model the run made: its merge where it merged, else its last checkpoint."""
    steps = recipe.steps(budget_steps)
    run_dir = work / f"{recipe.run_name or Path(recipe.config).stem}-seed{seed}-{steps}steps"
    if not (run_dir / "finished").is_file():
        stsb_dev = ", stsb: builtin:stsb/dev" if "builtin:stsb/train" in train_path else ""
        fit(recipe, seed, steps, [f"--data.train_path={train_path}",
                                  f"--data.val_path={{duplicates: {selection}{stsb_dev}}}"], run_dir)
    merged = sorted((run_dir / "checkpoints").glob("merged-alpha*.ckpt"))
    return merged[0] if merged else run_dir / "checkpoints" / "last.ckpt"


def fit(recipe: Recipe, seed: int, steps: int, data: list[str], run_dir: Path) -> None:
    command = [sys.executable, "-m", "minilm_sts", "fit", "--config", str(ROOT / recipe.config),
               "--seed_everything", str(seed), *data, "--data.retrieval", "[duplicates]",
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.logger", "false", "--trainer.default_root_dir", str(run_dir),
               "--data.batch_size", str(recipe.batch_size), *recipe.overrides]
    subprocess.run(command, check=True, cwd=ROOT)
    (run_dir / "finished").touch()


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
    header = ["Recipe", "Trained on", "Steps × batch", "Merge α", "Seed", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == name]
        for r in runs:
            trained = r["data"] != "-"
            cells = [f"{r['steps']:,} × {r['batch_size']}" if trained else "-", f"{r['alpha']:g}" if "alpha" in r
                     else "-", str(r["seed"]) if trained else "-", *(f"{r[key]:.4f}" for key in COLUMNS)]
            lines.append("| " + " | ".join([name, r["data"], *cells]) + " |")
        if len(runs) > 1:
            cells = [f"**{statistics.mean(v):.4f}** (spread {max(v) - min(v):.4f})"
                     for v in ([r[key] for r in runs] for key in COLUMNS)]
            lines.append("| " + " | ".join([f"**{name}, mean**", runs[0]["data"], "", "", "all", *cells]) + " |")
    # The data folders by name only: their place is the reader's own, not this machine's.
    retrain = " --retrain " + " ".join(f"'{name}'" for name in args.retrain) if args.retrain is not None else ""
    command = (f"python scripts/quality_table.py --quora {args.quora.name} "
               f"--quora-dup-random {args.quora_dup_random.name} --dev-rows {args.dev_rows} --steps {args.steps} "
               f"--seeds {' '.join(map(str, args.seeds))}{retrain}")
    seconds = statistics.median(r["retrieval_seconds"] for r in results)
    precision = "bf16-mixed" if cpu_has_native_bf16() else "32-true"  # what the recipes' 16-mixed becomes here
    dates = ", ".join(sorted({r["measured"] for r in results}))
    return (f"{TABLE_START}\nMeasured {dates} with torch {torch.__version__} on "
            f"{describe_machine(machine())}: trained in {precision} (what the "
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
