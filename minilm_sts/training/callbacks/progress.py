"""Lightning's progress bars, showing the training loss without making any step wait for it."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from minilm_sts._compat import is_logging_step, step_loss


class ShowsLoggedLoss:
    """Mixed into a progress bar: shows the training loss as read at the last logging step. Lightning's bars
    show each value logged with `prog_bar=True` by reading it back from the device at every batch, which makes
    the host wait for the step to finish."""

    _shown: dict[str, str]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if is_logging_step(trainer):
            self._shown["loss"] = f"{float(step_loss(trainer, outputs)):.4g}"
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {**super().get_metrics(trainer, pl_module), **self._shown}


class LoggedLossBar(ShowsLoggedLoss, TQDMProgressBar):
    """Lightning's tqdm bar, with the loss of the last logging step."""


class LoggedLossRichBar(ShowsLoggedLoss, RichProgressBar):
    """Lightning's rich bar (its default where `rich` is installed), with the loss of the last logging step."""


def loss_showing_bars(trainer: L.Trainer) -> list[ShowsLoggedLoss]:
    """For the trainer's progress bar, if it is one of Lightning's own (not another, nor none), the same bar with
    the same settings showing the loss: returned from `configure_callbacks`, it takes the bar's place."""
    replacements = {TQDMProgressBar: LoggedLossBar, RichProgressBar: LoggedLossRichBar}
    bars = []
    for bar in trainer.callbacks:
        if type(bar) in replacements:
            # A copy of the bar's settings: it has drawn nothing yet, since the trainer calls this before fitting.
            shown = object.__new__(replacements[type(bar)])
            shown.__dict__.update(bar.__dict__, _shown={})
            bars.append(shown)
    return bars
