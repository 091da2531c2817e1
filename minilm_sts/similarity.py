"""What sentence similarity means in this package: pooling and the evaluation scores (the losses are in losses.py)."""

from __future__ import annotations

import torch


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens; the count is clamped at 1e-9 exactly as the reference does."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def correlations(cosine: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman (average ranks for ties) of cosine against label, in float64 like scipy."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    cosine, labels = cosine.double(), labels.double()
    return {"pearson_cosine": pearson_corrcoef(cosine, labels).item(),
            "spearman_cosine": spearman_corrcoef(cosine, labels).item()}
