"""What sentence similarity means in this package: pooling and the evaluation scores (the losses are in losses.py)."""

from __future__ import annotations

import torch


def correlations(cosine: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman (average ranks for ties) of cosine against label, in float64 like scipy."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    cosine, labels = cosine.double(), labels.double()
    return {"pearson_cosine": pearson_corrcoef(cosine, labels).item(),
            "spearman_cosine": spearman_corrcoef(cosine, labels).item()}
