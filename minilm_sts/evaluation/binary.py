"""Cosine as a duplicate detector on a set labelled 0 or 1, as sentence-transformers'
BinaryClassificationEvaluator computes it: best accuracy and F1 with their thresholds, precision, recall,
Matthews correlation and average precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_pair_scores(cosine: torch.Tensor, labels: torch.Tensor) -> None:
    """The check every pair metric makes first: two non-empty 1-D tensors of one length, all scores finite."""
    if cosine.dim() != 1 or cosine.shape != labels.shape or len(cosine) == 0:
        raise ValueError(f"pair metrics need two non-empty 1-D tensors of one length; got scores of shape "
                         f"{tuple(cosine.shape)} and labels of shape {tuple(labels.shape)}")
    if not torch.isfinite(cosine).all():
        raise ValueError("pair metrics need finite scores; some cosine scores are NaN or infinite")


def is_binary(labels: torch.Tensor) -> bool:
    """True when every label is 0 or 1 and both occur: only then do classification metrics mean anything."""
    return bool(((labels == 0) | (labels == 1)).all()) and bool((labels == 0).any()) and bool((labels == 1).any())


def binary_classification(cosine: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Cosine as a duplicate detector: average precision, the best F1 (with its precision, recall, threshold and
    Matthews correlation) and the best accuracy with its threshold.

    A threshold t predicts "duplicate" for cosine >= t. Candidate thresholds sit midway between neighbouring
    distinct scores, so tied pairs are always classified together; among equally good thresholds the highest
    wins. Both classes must be present, because precision, recall and AP are undefined otherwise."""
    check_pair_scores(cosine, labels)
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
