"""CPU speed-ups for BERT's layers, each a drop-in subclass of the torch layer it replaces: the same result up to
float rounding, and torch's own kernel wherever the speed-up does not apply (GPUs, autograd, autocast, compiled
code). Measured in docs/benchmarks.md."""

from __future__ import annotations

import torch
from torch import nn

from minilm_sts._compat import onednn_linear

# torch builds without oneDNN (rare) fall back to the default matrix product everywhere.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available()


class Linear(nn.Linear):
    """nn.Linear whose gradient-free fp32 CPU forward calls oneDNN's matrix product directly. On this project's
    CPUs it runs inference's small, varying-height products 6-20% faster than the default (MKL) path, with the
    same result up to float rounding. Training keeps the default path and its autograd, autocast its casts,
    and `torch.compile` its own kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ONEDNN_LINEAR and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.is_cpu
                and x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
            return onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU training mask is one fp32 uniform draw per element compared with p: the same keep
    probability as torch's CPU kernel, which draws Bernoulli noise as floats and rescales it in extra passes, at
    two thirds of its forward-and-backward time (docs/benchmarks.md). Elsewhere (GPUs, compiled code) it is
    torch's own fused dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0 < self.p < 1 and x.is_cpu) or torch.compiler.is_compiling():
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=torch.float32) >= self.p  # fp32 even under bf16 autocast: an exact p
        return x * keep * (1 / (1 - self.p))
