"""Hard negatives for positive pairs: for each anchor, the corpus sentences most similar to it by cosine that are
not duplicates of it, found by an exact search in blocks.

The selection follows sentence-transformers 6.x's `mine_hard_negatives` (a rank range, margins to the positive's
score, the top candidates or a random draw among them), with one difference by design: by default no sentence of
the anchor's duplicate cluster (the connected component of the positive-pair graph) is a negative, where
sentence-transformers leaves out only the anchor itself and its own positives. `cluster_masking=False` does as
it does.

How a candidate is chosen, for an anchor A:
1. The search returns A's `range_max + E` most similar corpus sentences, E being the most sentences left out for
   any anchor (itself and its cluster, or itself and its positives), so that every anchor keeps at least
   `range_max` of them, as sentence-transformers' window does.
2. Left out: A itself, its cluster (or its positives), and under a margin every candidate too close to A's least
   similar positive P: kept only if score + absolute_margin <= P and score <= P - |P| * relative_margin.
3. What remains, most similar first, is ranked from 0; ranks range_min up to range_max - 1 are A's candidates.
4. The first `num_negatives` of them, or as many drawn at random (seeded per anchor). An anchor with fewer
   candidates than that is dropped, with the reason counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minilm_sts.atomic import write_file_atomically
from minilm_sts.data.pairs import LABEL_COLUMN_CHOICES, column_names, read_id_columns, read_pairs, read_unlabelled_pairs
from minilm_sts.data.stackexchange import PAIR_WRITERS, Clusters
from minilm_sts.errors import UserInputError
from minilm_sts.evaluation.retrieval import top_k_search

SAMPLING_STRATEGIES = ("top", "random")
OUTPUT_FORMATS = ("triplets", "pairs")
ANCHOR_BLOCK = 1024  # anchors searched at once: one progress step
GATHER_FLOATS = 1 << 22  # at most this many floats of gathered candidate embeddings per block (16 MiB)


@dataclass(frozen=True)
class MiningOptions:
    """What `mine_negatives` keeps; the names and defaults are sentence-transformers'. `range_max` None: as it
    derives it, range_min + num_negatives (times 10 under a margin) + the most positives of any anchor."""

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling_strategy: str = "top"
    seed: int = 42
    cluster_masking: bool = True

    def check(self) -> None:
        if self.num_negatives < 1:
            raise UserInputError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if self.range_min < 0:
            raise UserInputError(f"range_min must be at least 0, got {self.range_min}")
        if self.range_max is not None and self.range_max - self.range_min < self.num_negatives:
            raise UserInputError(f"the rank range [{self.range_min}, {self.range_max}) holds fewer than "
                                 f"num_negatives={self.num_negatives} candidates; widen it or ask for fewer")
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise UserInputError(f"{name} must be a number >= 0, got {value}")
        if self.seed < 0:
            raise UserInputError(f"seed must be at least 0, got {self.seed}")
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise UserInputError(f"sampling_strategy must be one of {', '.join(SAMPLING_STRATEGIES)}, "
                                 f"got {self.sampling_strategy!r}")

    @property
    def has_margin(self) -> bool:
        return self.absolute_margin is not None or self.relative_margin is not None

    def settled_range_max(self, most_positives: int) -> int:
        if self.range_max is not None:
            return self.range_max
        return self.range_min + self.num_negatives * (10 if self.has_margin else 1) + most_positives


@dataclass
class PositivePairs:
    """A pair source's positive pairs grouped by anchor (the first sentence), anchors in the order they first
    appear, and the duplicate clusters of its sentences."""

    anchors: list[str]
    positives: list[list[str]]  # each anchor's distinct positives, in order
    sentences: list[str]  # every distinct sentence of the source, both columns, every row
    clusters: Clusters  # keyed by `cluster_key`


def cluster_key(text: str) -> str:
    """Texts that differ only in case or spacing are one sentence: an uncased tokenizer (the base model's) gives
    them the same tokens."""
    return " ".join(text.lower().split())


def read_positive_pairs(source: str, label_scale: float = 1.0,
                        id_columns: Sequence[str] | None = None) -> PositivePairs:
    """Positive pairs are rows labelled >= 1 after dividing by `label_scale`; every row, in a source with no
    label or score column (an (anchor, positive) file, as sentence-transformers mines from). `id_columns` name two
    columns of question ids (whole numbers or texts): texts that share an id join one cluster, whatever their
    wording."""
    columns = column_names(source)
    if any(name in columns for name in LABEL_COLUMN_CHOICES):
        table = read_pairs(source, label_scale=label_scale)
        rows = list(zip(table.sentences_a, table.sentences_b))
        positive = [label >= 1.0 for label in table.labels]
    else:
        both = read_unlabelled_pairs(source)
        if both is None:
            raise UserInputError(f"{source}: no sentence columns (sentence_0 and sentence_1, sentence1 and "
                                 f"sentence2, or anchor and positive); the columns are {columns}")
        rows, positive = list(zip(*both)), [True] * len(both[0])
    pairs = [row for row, is_positive in zip(rows, positive) if is_positive]
    if not pairs:
        raise UserInputError(f"{source}: no positive pairs (label >= 1 after dividing by label_scale="
                             f"{label_scale:g}); hard negatives are mined for positive pairs")
    clusters = Clusters()
    for a, b in pairs:
        clusters.union(cluster_key(a), cluster_key(b))
    if id_columns:
        _join_by_ids(clusters, rows, read_id_columns(source, id_columns))
    grouped: dict[str, dict[str, None]] = {}
    for a, b in pairs:
        grouped.setdefault(a, {})[b] = None
    sentences = list(dict.fromkeys(text for row in rows for text in row))
    return PositivePairs(list(grouped), [list(p) for p in grouped.values()], sentences, clusters)


def _join_by_ids(clusters: Clusters, rows: list[tuple[str, str]], ids: list[list[str]]) -> None:
    """Each id's texts join the cluster of the first text seen with it."""
    first_text: dict[str, str] = {}
    for pair, pair_ids in zip(rows, zip(*ids)):
        for text, question in zip(pair, pair_ids):
            clusters.union(cluster_key(text), first_text.setdefault(question, cluster_key(text)))


@dataclass
class Mined:
    """Each anchor's negatives (None when dropped), most similar first, and why anchors were dropped."""

    anchors: list[str]
    positives: list[list[str]]
    negatives: list[list[str] | None]
    dropped: Counter
    num_negatives: int
    corpus_size: int
    rank_range: tuple[int, int]

    @property
    def kept(self) -> int:
        return sum(n is not None for n in self.negatives)

    def summary_lines(self) -> list[str]:
        dropped = ", ".join(f"{n:,} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return [f"anchors: {len(self.anchors):,} ({sum(map(len, self.positives)):,} positive pairs); "
                f"corpus: {self.corpus_size:,} sentences; candidate ranks {self.rank_range[0]} to "
                f"{self.rank_range[1] - 1}",
                f"negatives: {self.kept * self.num_negatives:,} ({self.num_negatives} for each of {self.kept:,} "
                "anchors)",
                f"anchors dropped: {len(self.anchors) - self.kept:,} ({dropped})"]


def mine_negatives(model, pairs: PositivePairs, corpus: Sequence[str] | None = None,
                   options: MiningOptions = MiningOptions(), batch_size: int = 32,
                   show_progress: bool = False) -> Mined:
    """Mine `options.num_negatives` hard negatives for each anchor of `pairs` from `corpus` (by default every
    sentence of the pair source), embedded by `model.encode`."""
    options.check()
    corpus = list(dict.fromkeys(pairs.sentences if corpus is None else corpus))
    texts = list(dict.fromkeys([*corpus, *pairs.anchors, *(p for group in pairs.positives for p in group)]))
    row_of = {text: i for i, text in enumerate(texts)}
    embeddings = model.encode(texts, batch_size=batch_size, show_progress=show_progress)
    anchors = torch.tensor([row_of[a] for a in pairs.anchors])
    positive_rows = [[row_of[p] for p in group] for group in pairs.positives]
    group = _groups(texts, pairs.clusters) if options.cluster_masking else torch.arange(len(texts))
    search = _Search(embeddings, len(corpus), anchors, positive_rows, group, options)
    blocks = search.blocks()
    if show_progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="Searching", unit="block")
    negatives, dropped = [], Counter()
    for start, stop in blocks:
        chosen, why = search.block(start, stop)
        negatives += [None if rows is None else [corpus[i] for i in rows] for rows in chosen]
        dropped.update(reason for reason in why if reason)
    return Mined(pairs.anchors, pairs.positives, negatives, dropped, options.num_negatives, len(corpus),
                 (options.range_min, search.range_max))


def _groups(texts: list[str], clusters: Clusters) -> torch.Tensor:
    """A number per text, shared by the texts of one duplicate cluster."""
    number: dict[str, int] = {}
    return torch.tensor([number.setdefault(clusters.find(cluster_key(t)), len(number)) for t in texts])


class _Search:
    """The candidate windows of blocks of anchors, and the selection in them."""

    def __init__(self, embeddings: torch.Tensor, corpus_size: int, anchors: torch.Tensor,
                 positive_rows: list[list[int]], group: torch.Tensor, options: MiningOptions):
        self.embeddings, self.corpus = embeddings, embeddings[:corpus_size]
        self.anchors, self.group, self.options = anchors, group, options
        lengths = torch.tensor([len(rows) for rows in positive_rows])
        owner = torch.repeat_interleave(torch.arange(len(anchors)), lengths)
        flat = torch.tensor([row for rows in positive_rows for row in rows])
        # (anchor number, text row) of each positive pair as one integer, to test a whole window with one isin.
        self.stride = len(embeddings)
        self.positive_keys = owner * self.stride + flat
        scores = (embeddings[anchors[owner]] * embeddings[flat]).sum(dim=1)
        # The margin is to the anchor's least similar positive, as in sentence-transformers: the safer choice.
        self.hardest_positive = torch.full((len(anchors),), float("inf")).scatter_reduce(0, owner, scores, "amin")
        self.range_max = options.settled_range_max(int(lengths.max()))
        # Texts left out for each anchor: those of its group, and its positives outside it (none under masking).
        # The window is as much deeper than range_max as the most of any anchor, as in sentence-transformers.
        outside = (group[flat] != group[anchors[owner]]).long()
        left_out_count = torch.bincount(group)[group[anchors]].index_add(0, owner, outside)
        self.window = min(self.range_max + int(left_out_count.max()), corpus_size)

    def blocks(self) -> list[tuple[int, int]]:
        starts = range(0, len(self.anchors), ANCHOR_BLOCK)
        return [(start, min(start + ANCHOR_BLOCK, len(self.anchors))) for start in starts]

    def block(self, start: int, stop: int) -> tuple[list[list[int] | None], list[str | None]]:
        """For anchors start..stop-1: the corpus rows of their negatives (None if dropped) and why dropped."""
        rows = self.anchors[start:stop]
        window = top_k_search(self.embeddings[rows], self.corpus, self.window)
        scores = self._scores(rows, window)
        numbers = torch.arange(start, stop)[:, None]
        left_out = (self.group[window] == self.group[rows][:, None]) | torch.isin(
            numbers * self.stride + window, self.positive_keys)
        in_range = self._in_range(~left_out & self._past_margins(scores, self.hardest_positive[start:stop]))
        chosen, why = [], []
        for i, candidates in enumerate(in_range):
            places = candidates.nonzero().flatten()
            enough = len(places) >= self.options.num_negatives
            chosen.append(window[i, self._pick(places, start + i)].tolist() if enough else None)
            why.append(None if enough else self._why_short(left_out[i]))
        return chosen, why

    def _scores(self, rows: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Each anchor's scores against its window, for a few anchors at a time: their candidates' embeddings are
        gathered (at most GATHER_FLOATS floats)."""
        step = max(1, GATHER_FLOATS // (window.shape[1] * self.corpus.shape[1]))
        parts = [torch.einsum("bd,bkd->bk", self.embeddings[rows[i : i + step]], self.corpus[window[i : i + step]])
                 for i in range(0, len(rows), step)]
        return torch.cat(parts)

    def _past_margins(self, scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(scores, dtype=torch.bool)
        if self.options.absolute_margin is not None:
            keep &= scores + self.options.absolute_margin <= positive[:, None]
        if self.options.relative_margin is not None:
            # |P|, not P: a negative positive score must lower the bar too, not raise it.
            keep &= scores <= (positive - positive.abs() * self.options.relative_margin)[:, None]
        return keep

    def _in_range(self, kept: torch.Tensor) -> torch.Tensor:
        """Which kept candidates fall in the rank range, ranks counted among the kept ones, most similar first."""
        rank = kept.long().cumsum(dim=-1) - 1
        return kept & (rank >= self.options.range_min) & (rank < self.range_max)

    def _pick(self, places: torch.Tensor, anchor: int) -> torch.Tensor:
        k = self.options.num_negatives
        if self.options.sampling_strategy == "top":
            return places[:k]
        # One generator per anchor, from the seed and the anchor's number: the draw does not depend on blocks.
        draw = np.random.default_rng([self.options.seed, anchor]).choice(len(places), size=k, replace=False)
        return places[torch.from_numpy(np.sort(draw))]

    def _why_short(self, left_out: torch.Tensor) -> str:
        k = self.options.num_negatives
        if self.options.has_margin and self._in_range(~left_out).sum() >= k:
            return f"the margins left fewer than {k} candidates in the rank range"
        excluded = "its cluster" if self.options.cluster_masking else "its positives"
        return f"fewer than {k} candidates outside {excluded} in the rank range"


def mined_rows(mined: Mined, output_format: str) -> tuple[list[str], list[tuple]]:
    """Columns and records: `triplets`, one row per positive pair (anchor, positive, negative_1..negative_k), as
    sentence-transformers' n-tuple format; `pairs`, labelled pairs (sentence_0, sentence_1, label) with each
    positive pair as 1.0 and each anchor and negative as 0.0. Dropped anchors give no rows."""
    kept = [(a, p, n) for a, p, n in zip(mined.anchors, mined.positives, mined.negatives) if n is not None]
    if output_format == "triplets":
        columns = ["anchor", "positive", *(f"negative_{i}" for i in range(1, mined.num_negatives + 1))]
        return columns, [(a, p, *n) for a, ps, n in kept for p in ps]
    if output_format == "pairs":
        return ["sentence_0", "sentence_1", "label"], [
            row for a, ps, n in kept for row in [*((a, p, 1.0) for p in ps), *((a, x, 0.0) for x in n)]]
    raise UserInputError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")


def output_writer(output: Path):
    """The table writer that the output file's name selects."""
    kind = output.suffix.lstrip(".")
    if kind not in PAIR_WRITERS:
        raise UserInputError(f"{output}: name the output .tsv, .csv, .jsonl or .parquet, not {output.suffix!r}")
    return PAIR_WRITERS[kind]


def write_mined(mined: Mined, output: Path, output_format: str = "triplets") -> int:
    """Write the rows under a temporary name, renamed when complete; the number of rows."""
    write = output_writer(output)
    columns, records = mined_rows(mined, output_format)
    write_file_atomically(output, lambda partial: write(partial, columns, records))
    return len(records)
