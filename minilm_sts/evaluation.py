"""Evaluation as its own unit: named metrics from the scores of a model, independent of training.

Two kinds of evaluation live here.

* Pair-score metrics take a set's cosine scores and labels (1-D tensors) and return named values.
  `PAIR_METRICS` is the one registry: each entry says which sets it applies to. Adding a metric means writing
  its function and adding one line there. `PairScores` accumulates a split's scores batch by batch, like a
  torchmetrics metric, gathers them from every process and computes every metric that applies.
* `DuplicateRetrieval` ranks a corpus for each query with an `encode` callable and returns retrieval metrics.

Definitions and metric names follow sentence-transformers' evaluators (`EmbeddingSimilarityEvaluator`,
`BinaryClassificationEvaluator`, `InformationRetrievalEvaluator`, cosine similarity), so the numbers compare
directly with theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from minilm_sts.similarity import correlations

Encode = Callable[[list[str]], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Pair-score metrics


def is_binary(labels: torch.Tensor) -> bool:
    """True when every label is 0 or 1 and both occur: only then do classification metrics mean anything."""
    return bool(((labels == 0) | (labels == 1)).all()) and bool((labels == 0).any()) and bool((labels == 1).any())


def binary_classification(cosine: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cosine as a duplicate detector: average precision, the best F1 (with its precision, recall, threshold and
    Matthews correlation) and the best accuracy with its threshold.

    A threshold t predicts "duplicate" for cosine >= t. Candidate thresholds sit midway between neighbouring
    distinct scores, so tied pairs are always classified together; among equally good thresholds the highest
    wins. Both classes must be present, because precision, recall and AP are undefined otherwise."""
    _check_pair_scores(cosine, labels)
    if not is_binary(labels):
        found = sorted({float(x) for x in labels.unique()[:5]})
        raise ValueError(f"binary classification needs labels 0 and 1, both present; found {found}")
    cosine = cosine if cosine.dtype == torch.float64 else cosine.float()
    curve = _threshold_curve(cosine, labels.double())
    accuracy, accuracy_threshold = _best_accuracy(curve)
    f1 = _best_f1(curve)
    return {"cosine_accuracy": accuracy, "cosine_accuracy_threshold": accuracy_threshold,
            "cosine_f1": f1["f1"], "cosine_precision": f1["precision"], "cosine_recall": f1["recall"],
            "cosine_f1_threshold": f1["threshold"], "cosine_ap": _average_precision(curve),
            "cosine_mcc": _matthews(cosine >= f1["threshold"], labels == 1)}


@dataclass(frozen=True)
class _Curve:
    """The pairs sorted by descending score and cut after each group of equal scores. Entry i describes the
    threshold that admits groups 0..i: how many pairs it predicts positive and how many of those are."""

    group_scores: torch.Tensor  # distinct scores, descending
    predicted: torch.Tensor  # float64 counts
    true_positives: torch.Tensor  # float64 counts
    positives: float
    total: int

    def cut_points(self) -> torch.Tensor:
        """Threshold i: midway to the next lower distinct score (the score itself for the last group). A
        midpoint rounded onto the next score would admit that group too, so it falls back to the group's own."""
        high, low = self.group_scores[:-1], self.group_scores[1:]
        middle = (high + low) / 2
        return torch.cat([torch.where(middle == low, high, middle), self.group_scores[-1:]])


def _threshold_curve(scores: torch.Tensor, labels: torch.Tensor) -> _Curve:
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    group_end = torch.ones_like(scores, dtype=torch.bool)
    group_end[:-1] = scores[1:] != scores[:-1]
    ends = group_end.nonzero().squeeze(1)
    return _Curve(group_scores=scores[ends], predicted=(ends + 1).double(),
                  true_positives=torch.cumsum(labels, 0)[ends], positives=labels.sum().item(), total=len(scores))


def _best_accuracy(curve: _Curve) -> tuple[float, float]:
    """Accuracy over all thresholds, starting from one just above the top score (everything "different")."""
    negatives = curve.total - curve.positives
    true_negatives = negatives - (curve.predicted - curve.true_positives)
    accuracy = torch.cat([torch.tensor([negatives], dtype=torch.float64), curve.true_positives + true_negatives])
    accuracy = accuracy / curve.total
    above_all = torch.nextafter(curve.group_scores[:1], torch.tensor(float("inf"), dtype=curve.group_scores.dtype))
    thresholds = torch.cat([above_all, curve.cut_points()])
    best = int(torch.argmax(accuracy))  # the first maximum: the highest threshold among equals
    return accuracy[best].item(), thresholds[best].item()


def _best_f1(curve: _Curve) -> dict[str, float]:
    precision = curve.true_positives / curve.predicted
    recall = curve.true_positives / curve.positives
    f1 = 2 * precision * recall / (precision + recall)
    f1 = torch.where(curve.true_positives > 0, f1, 0.0)  # 0/0 before the first positive is admitted
    best = int(torch.argmax(f1))
    return {"f1": f1[best].item(), "precision": precision[best].item(), "recall": recall[best].item(),
            "threshold": curve.cut_points()[best].item()}


def _average_precision(curve: _Curve) -> float:
    """Precision at each threshold weighted by the recall it adds (the step-wise area, no interpolation)."""
    new_positives = torch.diff(curve.true_positives, prepend=torch.zeros(1, dtype=torch.float64))
    return (new_positives / curve.positives * curve.true_positives / curve.predicted).sum().item()


def _matthews(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    tp, fp = (predicted & actual).sum().item(), (predicted & ~actual).sum().item()
    fn, tn = (~predicted & actual).sum().item(), (~predicted & ~actual).sum().item()
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def _check_pair_scores(cosine: torch.Tensor, labels: torch.Tensor) -> None:
    if cosine.dim() != 1 or cosine.shape != labels.shape or len(cosine) == 0:
        raise ValueError(f"pair metrics need two non-empty 1-D tensors of one length; got scores of shape "
                         f"{tuple(cosine.shape)} and labels of shape {tuple(labels.shape)}")
    if not torch.isfinite(cosine).all():
        raise ValueError("pair metrics need finite scores; some cosine scores are NaN or infinite")


@dataclass(frozen=True)
class PairMetric:
    """A family of metrics over a set's (cosine, labels), and the rule saying which sets it applies to."""

    name: str
    compute: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    applies: Callable[[torch.Tensor], bool]


PAIR_METRICS: tuple[PairMetric, ...] = (
    PairMetric("correlation", correlations, applies=lambda labels: True),
    PairMetric("binary", binary_classification, applies=is_binary),
)


def pair_metrics(cosine: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Every registered metric that applies to this set, by name (`spearman_cosine`, `cosine_ap`, ...)."""
    _check_pair_scores(cosine, labels)
    values: dict[str, float] = {}
    for metric in PAIR_METRICS:
        if metric.applies(labels):
            values.update(metric.compute(cosine, labels))
    return values


class ScoredSet(NamedTuple):
    """A whole evaluation set's cosine scores and labels, each pair once in pair order, and its metrics."""

    cosine: torch.Tensor
    labels: torch.Tensor
    metrics: dict[str, float]


class PairScores(Metric):
    """One evaluation set's pair scores, accumulated batch by batch (a torchmetrics metric).

    `update` takes a batch's cosine scores, labels and pair indices (each pair's position in the set).
    `compute` gathers them from every process, keeps each pair once, in pair order (a distributed sampler
    repeats a few pairs so that every process gets as many), and returns a `ScoredSet` whose metrics are
    every pair metric that applies to the set. `reset` empties it for the next pass.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("cosine", "labels", "indices"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, cosine: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.cosine.append(cosine.detach().float())
        self.labels.append(labels.detach().float())
        self.indices.append(indices.detach().long())

    def compute(self) -> ScoredSet:
        # After a gather the states are single tensors, before it lists of batches: dim_zero_cat takes both.
        _, first = np.unique(dim_zero_cat(self.indices).cpu().numpy(), return_index=True)
        keep = torch.from_numpy(first)
        cosine, labels = (dim_zero_cat(state).cpu()[keep] for state in (self.cosine, self.labels))
        return ScoredSet(cosine, labels, pair_metrics(cosine, labels))


# ---------------------------------------------------------------------------------------------------------------
# Duplicate retrieval

# Cutoffs reported. Recall@k is the share of a query's duplicates found in the top k; accuracy@k is the share of
# queries with at least one duplicate in the top k (the two differ for queries with several duplicates).
MRR_AT, NDCG_AT, MAP_AT, RECALL_AT, ACCURACY_AT = (10,), (10,), (100,), (1, 10, 100), (1, 10)
DEEPEST = max(MRR_AT + NDCG_AT + MAP_AT + RECALL_AT + ACCURACY_AT)


@dataclass(frozen=True)
class DuplicateRetrieval:
    """Find each query's duplicates in a corpus by cosine similarity.

    Built from a pair table by `from_pairs`. Queries are corpus sentences (`queries` holds their corpus
    positions), so one embedding of the corpus serves both sides. A query is left out of its own ranking: its
    text is in the corpus, and finding itself says nothing about finding its duplicates. Everything else ranks
    as in `InformationRetrievalEvaluator`: descending cosine, ties to the earlier corpus position.
    """

    corpus: list[str]
    queries: list[int]  # corpus position of each query
    relevant: list[list[int]]  # corpus positions of each query's duplicates

    @classmethod
    def from_pairs(cls, sentences_a: Sequence[str], sentences_b: Sequence[str], labels: Sequence[float],
                   corpus: Sequence[str] = (), positive_label: float = 1.0) -> "DuplicateRetrieval":
        """Each distinct first sentence of a positive pair (label >= `positive_label`) is a query. Its relevant
        documents are every sentence it forms a positive pair with, in either column. The corpus is `corpus`
        followed by every distinct sentence of the table, negatives' included, each once."""
        if not len(sentences_a) == len(sentences_b) == len(labels):
            raise ValueError(f"pair columns differ in length: {len(sentences_a)}, {len(sentences_b)}, {len(labels)}")
        texts = list(dict.fromkeys([*corpus, *sentences_a, *sentences_b]))
        position = {text: i for i, text in enumerate(texts)}
        positives = [(position[a], position[b]) for a, b, label in zip(sentences_a, sentences_b, labels)
                     if label >= positive_label and a != b]
        if not positives:
            raise ValueError(f"no pair is labelled >= {positive_label} (with two different sentences): "
                             "duplicate retrieval needs positive pairs")
        duplicates: dict[int, set[int]] = {}
        for a, b in positives:
            duplicates.setdefault(a, set()).add(b)
            duplicates.setdefault(b, set()).add(a)
        queries = list(dict.fromkeys(a for a, _ in positives))
        return cls(corpus=texts, queries=queries, relevant=[sorted(duplicates[q]) for q in queries])

    def evaluate(self, encode: Encode) -> dict[str, float]:
        """Embed the corpus once with `encode` (sentences -> [n, dim] embeddings) and score the rankings."""
        return self.evaluate_embeddings(encode(self.corpus))

    def evaluate_embeddings(self, corpus_embeddings: torch.Tensor) -> dict[str, float]:
        """The metrics from embeddings of `corpus`, row for row (for callers that embed it themselves)."""
        if corpus_embeddings.dim() != 2 or len(corpus_embeddings) != len(self.corpus):
            raise ValueError(f"expected embeddings of shape [{len(self.corpus)}, dim] for the corpus; "
                             f"got {tuple(corpus_embeddings.shape)}")
        corpus_embeddings = F.normalize(corpus_embeddings.float(), dim=1)
        queries = torch.tensor(self.queries)
        ranked = top_k_search(corpus_embeddings[queries], corpus_embeddings, DEEPEST, exclude=queries)
        return retrieval_metrics(ranked, self.relevant)


def top_k_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                 query_chunk: int = 1024, corpus_chunk: int = 16384) -> torch.Tensor:
    """Corpus positions of each query's k best matches by dot product, best first, ties to the earlier
    position. `exclude[q]` is a position that query q must not match (it ranks below everything).

    Scores are made chunk by chunk (query_chunk x corpus_chunk floats at a time, 64 MiB by default), so memory
    stays flat however large the corpus; each chunk's best k merge into the running best k."""
    k = min(k, len(corpus))
    ranked = []
    for q_start in range(0, len(queries), query_chunk):
        block = queries[q_start : q_start + query_chunk]
        rows = torch.arange(len(block))
        best_scores = block.new_empty(len(block), 0)
        best = torch.empty(len(block), 0, dtype=torch.long)
        for c_start in range(0, len(corpus), corpus_chunk):
            scores = block @ corpus[c_start : c_start + corpus_chunk].T
            if exclude is not None:
                own = exclude[q_start : q_start + query_chunk] - c_start
                inside = (own >= 0) & (own < scores.shape[1])
                scores[rows[inside], own[inside]] = float("-inf")
            chunk_scores, chunk_best = _ranked_top_k(scores, min(k, scores.shape[1]))
            # Earlier chunks hold earlier positions, so a stable sort keeps ties in position order.
            merged = torch.cat([best_scores, chunk_scores], dim=1)
            order = merged.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_scores = merged.gather(1, order)
            best = torch.cat([best, chunk_best + c_start], dim=1).gather(1, order)
        ranked.append(best)
    return torch.cat(ranked)


def _ranked_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k highest scores ordered by (score descending, column ascending). torch.topk picks among
    scores tied at the cut arbitrarily; such rows are sorted in full instead, which picks the earliest."""
    values, columns = scores.topk(k, dim=1)
    crowded = (scores >= values[:, -1:]).sum(dim=1) > k
    if crowded.any():
        sorted_values, sorted_columns = scores[crowded].sort(dim=1, descending=True, stable=True)
        values[crowded], columns[crowded] = sorted_values[:, :k], sorted_columns[:, :k]
    by_column = columns.argsort(dim=1)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_score = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_score), columns.gather(1, by_score)


def retrieval_metrics(ranked: torch.Tensor, relevant: Sequence[Sequence[int]]) -> dict[str, float]:
    """MRR@10, NDCG@10 (binary gains), MAP@100 (divided by min(100, #relevant)), Recall@1/10/100 and
    Accuracy@1/10, averaged over queries, from each query's ranked corpus positions and its relevant positions."""
    hits = _hits(ranked, relevant).double()
    n_relevant = torch.tensor([len(docs) for docs in relevant], dtype=torch.float64)
    rank = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    discount = 1 / torch.log2(torch.arange(2, DEEPEST + 2, dtype=torch.float64))
    values = {}
    for k in MRR_AT:
        values[f"cosine_mrr@{k}"] = (hits[:, :k] / rank[:k]).max(dim=1).values.mean().item()
    for k in NDCG_AT:
        ideal = torch.cumsum(discount, 0)[n_relevant.clamp(max=k).long() - 1]
        values[f"cosine_ndcg@{k}"] = ((hits[:, :k] * discount[: hits[:, :k].shape[1]]).sum(1) / ideal).mean().item()
    for k in MAP_AT:
        precision_at_hit = torch.cumsum(hits[:, :k], 1) / rank[:k] * hits[:, :k]
        values[f"cosine_map@{k}"] = (precision_at_hit.sum(1) / n_relevant.clamp(max=k)).mean().item()
    for k in RECALL_AT:
        values[f"cosine_recall@{k}"] = (hits[:, :k].sum(1) / n_relevant).mean().item()
    for k in ACCURACY_AT:
        values[f"cosine_accuracy@{k}"] = hits[:, :k].amax(dim=1).mean().item()
    return values


def _hits(ranked: torch.Tensor, relevant: Sequence[Sequence[int]]) -> torch.Tensor:
    """hits[q, r]: whether the document at rank r of query q is relevant to it. Each (query, document) pair
    becomes one integer key, so a single `isin` answers for every rank of every query."""
    stride = 2**32  # above any corpus position, so a key names one (query, document) pair
    relevant_keys = torch.cat([q * stride + torch.tensor(docs, dtype=torch.long) for q, docs in enumerate(relevant)])
    return torch.isin(torch.arange(len(relevant))[:, None] * stride + ranked, relevant_keys)
