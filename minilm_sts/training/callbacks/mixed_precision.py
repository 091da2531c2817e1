"""The optimizer steps that fp16 loss scaling skipped."""

from __future__ import annotations

from typing import Optional

import lightning as L


class SkippedStepCounter(L.Callback):
    """Under fp16 loss scaling, GradScaler skips an optimizer step whose gradients hold inf or NaN and lowers its
    scale: counts those steps (`skipped`, in this process) and logs the count as `train/skipped_steps`."""

    def __init__(self):
        self.skipped = 0
        self._scale_before_step: Optional[float] = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scale_before_step = scaler.get_scale() if scaler is not None else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._scale_before_step is None:
            return
        if trainer.precision_plugin.scaler.get_scale() < self._scale_before_step:
            self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
