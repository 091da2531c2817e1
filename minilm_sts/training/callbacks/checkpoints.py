"""Checkpoints beside the ranked ones: `last.ckpt` on a schedule, and the emergency save on SIGTERM."""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from minilm_sts._compat import save_last_checkpoint
from minilm_sts.training.run_folder import save_emergency_checkpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes `last.ckpt` (only) every `every_n_train_steps` steps, at every validation and at the end of
    training, so `fit --ckpt_path last` can resume from any of them. (ModelCheckpoint alone writes `last.ckpt`
    at a validation only when it saved a ranked checkpoint at that step.)"""

    def __init__(self, save_last: Optional[bool] = True, save_top_k: int = 0, every_n_train_steps: Optional[int] = 200,
                 **kwargs):
        super().__init__(save_last=save_last, save_top_k=save_top_k, every_n_train_steps=every_n_train_steps, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Also when the step's periodic save came first: that one holds the state before this validation. Not at
        # step 0 (the validation before training): as for ModelCheckpoint, there is nothing trained to save.
        if (trainer.state.fn == "fit" and trainer.global_step and not trainer.sanity_checking
                and not trainer.fast_dev_run):
            save_last_checkpoint(self, trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            save_last_checkpoint(self, trainer)


class SaveOnTerminate(L.Callback):
    """On SIGTERM (preemption), Lightning stops after the current batch; save `last.ckpt` before exiting so
    `fit --ckpt_path last` resumes exactly there."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = save_emergency_checkpoint(trainer, "last.ckpt")
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
