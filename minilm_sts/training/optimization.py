"""The recipe's optimizer and learning-rate schedule: AdamW with weight decay that spares biases and LayerNorm
weights unless asked, and a per-step schedule of linear warmup then linear decay (or constant)."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def adamw(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
          decay_bias_and_norm: bool, fused: bool) -> torch.optim.AdamW:
    """AdamW over two groups: decayed weights, and biases and LayerNorm weights (exempt unless asked)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            exempt = not decay_bias_and_norm and (name.endswith(".bias") or "LayerNorm" in name)
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def step_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, warmup_ratio: Optional[float],
                  total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, stepped once per optimizer step; a warmup ratio is rounded up to whole steps."""
    warmup = math.ceil(warmup_ratio * total) if warmup_ratio is not None else warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, warmup, total))


def lr_multiplier(kind: str, warmup: int, total: int):
    """The learning-rate multiplier at optimizer step s: linear warmup over `warmup` steps, then linear decay to
    0 at step `total` (Hugging Face's get_linear_schedule_with_warmup) or constant."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return multiplier
