"""The optimizer steps that fp16 loss scaling skipped."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from minilm_sts._compat import is_logging_step, loss_scale


class SkippedStepCounter(L.Callback):
    """Under fp16 loss scaling, GradScaler skips an optimizer step whose gradients hold inf or NaN and lowers its
    scale: counts those steps and logs the count as `train/skipped_steps` at logging steps. The count stays on
    the device (`skipped` reads it back), so a training step never waits for it."""

    def __init__(self):
        self._skipped: Optional[torch.Tensor] = None
        self._scale_before_step: Optional[torch.Tensor] = None

    @property
    def skipped(self) -> int:
        """Steps skipped so far in this process."""
        return 0 if self._skipped is None else int(self._skipped)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = None if scaler is None else loss_scale(scaler)
        self._scale_before_step = None if scale is None else scale.clone()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._scale_before_step is None:
            return
        lowered = loss_scale(trainer.precision_plugin.scaler) < self._scale_before_step
        self._skipped = lowered.long() if self._skipped is None else self._skipped + lowered
        if is_logging_step(trainer):
            pl_module.log("train/skipped_steps", self._skipped.float(), batch_size=1)
