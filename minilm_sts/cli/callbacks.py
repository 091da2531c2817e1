"""Callbacks the recipes use: how long a fit runs and its closing validation, `last.ckpt` at every validation,
export of the run's model at the end of fit, and a checkpoint on SIGTERM."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from minilm_sts._compat import epoch_batches_fetched
from minilm_sts.serving.export import export_with_card
from minilm_sts.training.callbacks.merge import merged_checkpoint


def training_length(max_steps: int, max_epochs: int, steps_per_epoch: int) -> str:
    """One sentence naming the bound that ends the run (-1 means no bound, as in Lightning)."""
    epoch = f"an epoch is {steps_per_epoch} steps"
    if max_steps == -1 and max_epochs == -1:
        return "Training has no step or epoch limit: it runs until stopped"
    if max_steps == -1:
        epochs = f"{max_epochs} epoch{'s' * (max_epochs != 1)}"
        return f"Training stops after {epochs}, {max_epochs * steps_per_epoch} steps (max_epochs; {epoch})"
    if max_epochs == -1:
        return f"Training stops after {max_steps} steps (max_steps; {epoch})"
    if max_steps <= max_epochs * steps_per_epoch:
        return (f"Training stops after {max_steps} steps: max_steps={max_steps} comes before "
                f"max_epochs={max_epochs} ({epoch})")
    return (f"Training stops after {max_epochs * steps_per_epoch} steps: max_epochs={max_epochs} comes before "
            f"max_steps={max_steps} ({epoch}); to train {max_steps} steps, leave out max_epochs")


class FitPlan(L.Callback):
    """Says at start-up which bound (max_steps or max_epochs) ends the run and when it validates, and makes
    the final step validate however short the run, so final metrics and a best checkpoint always exist."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        length = training_length(trainer.fit_loop.max_steps, trainer.fit_loop.max_epochs, steps_per_epoch)
        trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        rank_zero_info(f"Model: {type(pl_module).__name__}, {get_human_readable_count(total)} parameters "
                       f"({get_human_readable_count(trained)} trained). {length}; {self._validations(trainer)}.")

    @staticmethod
    def _validations(trainer: L.Trainer) -> str:
        interval, steps = trainer.val_check_interval, trainer.estimated_stepping_batches
        if not isinstance(interval, int) or trainer.check_val_every_n_epoch is not None:
            return "validation as configured and after the last step"
        if interval < steps:
            return f"validation every {interval} steps and after the last step"
        return f"validation after the last step only (val_check_interval={interval}, the run has {steps} steps)"

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        # Lightning validates after any batch that sets should_stop; on the final step, stopping changes nothing else.
        if self._final_step(trainer):
            trainer.should_stop = True

    @staticmethod
    def _final_step(trainer: L.Trainer) -> bool:
        loop = trainer.fit_loop
        if 0 < loop.max_steps <= trainer.global_step:
            return True
        epoch_done = epoch_batches_fetched(trainer) >= trainer.num_training_batches
        return epoch_done and loop.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= loop.max_epochs


class ExportBest(L.Callback):
    """At the end of `fit`, export the run's model as a sentence-transformers folder with its model card: the
    merge with the base when the run made one (MergeWithBase), otherwise the best checkpoint (by the checkpoint
    monitor; the last one if none was ranked). Off unless `dirpath` is set."""

    def __init__(self, dirpath: Optional[str] = None, overwrite: bool = False):
        self.dirpath = dirpath
        self.overwrite = overwrite

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.dirpath:
            return
        ranked = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        last = max((c.last_model_path for c in trainer.checkpoint_callbacks), default="")
        source = merged_checkpoint(trainer) or ranked or last
        if not source:
            raise RuntimeError("ExportBest needs a saved checkpoint; enable checkpointing")
        out = export_with_card(Path(source), Path(self.dirpath), overwrite=self.overwrite)
        rank_zero_info(f"Exported {source} to {out}")
