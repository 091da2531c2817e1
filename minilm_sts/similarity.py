"""What sentence similarity means in this package: pooling, the training loss, and the evaluation scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens; the count is clamped at 1e-9 exactly as the reference does."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def cosine_mse_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between cos(u, v) and the labels, in fp32 even under autocast."""
    cos = F.cosine_similarity(u.float(), v.float(), dim=1)
    return F.mse_loss(cos, labels.float().view(-1))


def correlation_metrics() -> "torchmetrics.MetricCollection":
    """Pearson and Spearman of cosine against label over a whole split (not averaged per batch).
    Feed float64: the running sums then match scipy to ~1e-12."""
    from torchmetrics import MetricCollection
    from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

    return MetricCollection({"pearson_cosine": PearsonCorrCoef(), "spearman_cosine": SpearmanCorrCoef()})
