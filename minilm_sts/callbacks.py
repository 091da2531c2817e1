"""Callbacks the recipes use: export of the best checkpoint at the end of fit, and a checkpoint on SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException


def checkpoint_folder(trainer: L.Trainer) -> Path:
    """Where this run's checkpoints go (the run folder when checkpointing is off)."""
    checkpoint = trainer.checkpoint_callback
    return Path(checkpoint.dirpath) if checkpoint and checkpoint.dirpath else Path(trainer.default_root_dir)


def save_emergency_checkpoint(trainer: L.Trainer, name: str) -> Path:
    """Save the training state now, beside the regular checkpoints (Lightning writes it atomically: a temporary
    file that is renamed when complete, so a kill during the save never leaves a broken file)."""
    path = checkpoint_folder(trainer) / name
    trainer.save_checkpoint(path)
    return path


class SaveOnTerminate(L.Callback):
    """On SIGTERM (preemption), Lightning stops after the current batch; save `last.ckpt` before exiting so
    `fit --ckpt_path last` resumes exactly there."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = save_emergency_checkpoint(trainer, "last.ckpt")
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")


class ExportBest(L.Callback):
    """At the end of `fit`, export the best checkpoint (by the checkpoint monitor; the last one if none was
    ranked) as a sentence-transformers folder with its model card. Off unless `dirpath` is set."""

    def __init__(self, dirpath: Optional[str] = None, overwrite: bool = False):
        self.dirpath = dirpath
        self.overwrite = overwrite

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.dirpath:
            return
        from minilm_sts.export import export_with_card

        ranked = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        source = ranked or max((c.last_model_path for c in trainer.checkpoint_callbacks), default="")
        if not source:
            raise RuntimeError("ExportBest needs a saved checkpoint; enable checkpointing")
        out = export_with_card(Path(source), Path(self.dirpath), overwrite=self.overwrite)
        rank_zero_info(f"Exported {source} to {out}")
