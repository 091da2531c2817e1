"""A set's pair-score metrics: `PAIR_METRICS` is the one registry (each entry says which sets it applies to;
adding a metric means writing its function and adding one line there), and `PairScores` accumulates a split's
scores batch by batch, like a torchmetrics metric, gathers them from every process and computes every metric
that applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from minilm_sts.evaluation.binary import binary_classification, check_pair_scores, is_binary
from minilm_sts.evaluation.correlations import correlations


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
    check_pair_scores(cosine, labels)
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
