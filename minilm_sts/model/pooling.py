"""Mean pooling: a sentence's embedding is the mean of its tokens' hidden states, as sentence-transformers pools."""

from __future__ import annotations

import torch


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens; the count is clamped at 1e-9 exactly as the reference does."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)
