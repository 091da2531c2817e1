"""The guard against a NaN or infinite training loss, kept on the device so that no training step waits for it.

Each step adds its loss to the guard (`record`) without reading it back. The guard reads one number back, the
index of the first non-finite loss, only at a logging step, before each validation, before any checkpoint is
written and at the end of training. So a run stops at most `log_every_n_steps` steps after the first bad one,
naming that one, and no checkpoint saved after it exists: `last.ckpt` and the ranked checkpoints all hold
weights from before it. The weights in memory, trained on it, are never saved.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from minilm_sts._compat import is_logging_step


class NonFiniteLoss(FloatingPointError):
    """The training loss is NaN or infinite: the run stops instead of training on garbage. It names the step,
    epoch and batch where it first was, and the step where the guard found it."""

    def __init__(self, loss: float, step: int, epoch: int, batch_idx: int, found_at: Optional[int] = None):
        super().__init__(loss, step, epoch, batch_idx, found_at)
        self.loss, self.step, self.epoch, self.batch_idx = loss, step, epoch, batch_idx
        self.found_at = step if found_at is None else found_at

    def __str__(self) -> str:
        later = f"; found at step {self.found_at}" if self.found_at != self.step else ""
        return (f"the training loss is {self.loss} at step {self.step} (epoch {self.epoch}, batch {self.batch_idx})"
                f"{later}; the run stops here. No checkpoint holds weights trained on it: last.ckpt and the ranked "
                "checkpoints are from before it. Under fp16, try bf16-mixed or 32-true, or a lower learning rate.")


class NonFiniteLossGuard(L.Callback):
    """Stops training on the first NaN or infinite loss that `record` saw (see the module's docstring)."""

    def __init__(self):
        self._first: Optional[torch.Tensor] = None  # index of the first bad record since the last check, or -1
        self._first_loss: Optional[torch.Tensor] = None
        self._count: Optional[torch.Tensor] = None  # records since the last check, counted on the device
        self._where: list[tuple[int, int, int]] = []  # (step, epoch, batch) of each of those records

    def record(self, loss: torch.Tensor, step: int, epoch: int, batch_idx: int) -> None:
        """Note this step's loss, on the device: nothing here waits for it to be computed."""
        loss = loss.detach().float()
        if self._count is None or self._count.device != loss.device:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._first_loss = torch.zeros((), device=loss.device)
            self._count = torch.zeros((), dtype=torch.long, device=loss.device)
        first_bad = ~torch.isfinite(loss) & (self._first < 0)
        self._first = torch.where(first_bad, self._count, self._first)
        self._first_loss = torch.where(first_bad, loss, self._first_loss)
        self._count += 1
        self._where.append((step, epoch, batch_idx))

    def check(self, found_at: int) -> None:
        """Raise NonFiniteLoss if a recorded loss was not finite; otherwise forget the records. Reads back one
        number from the device."""
        if self._first is None:
            return
        first = int(self._first)
        if first >= 0:
            raise NonFiniteLoss(float(self._first_loss), *self._where[first], found_at=found_at)
        self._count.zero_()
        self._where.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if is_logging_step(trainer):
            self.check(trainer.global_step - 1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self.check(trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check(trainer.global_step)  # raising here leaves the checkpoint unwritten

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer.global_step)
