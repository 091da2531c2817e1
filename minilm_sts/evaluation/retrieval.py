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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Encode = Callable[[list[str]], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Pair-score metrics


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
