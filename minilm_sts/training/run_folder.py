"""Where a run's files go: its own folder, its checkpoint folder, and checkpoints saved outside the schedule."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_folder(trainer: L.Trainer) -> Path:
    """This run's own folder, where Lightning puts its checkpoints: `<save_dir>/<name>/<version>/` of the first
    logger (runs/minilm-sts/<W&B run id>/), or `default_root_dir` when there is no logger."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def checkpoint_folder(trainer: L.Trainer) -> Path:
    """Where this run's checkpoints go (the run folder when checkpointing is off)."""
    checkpoint = trainer.checkpoint_callback
    return Path(checkpoint.dirpath) if checkpoint and checkpoint.dirpath else run_folder(trainer)


def save_emergency_checkpoint(trainer: L.Trainer, name: str) -> Path:
    """Save the training state now, beside the regular checkpoints (Lightning writes it atomically: a temporary
    file that is renamed when complete, so a kill during the save never leaves a broken file)."""
    path = checkpoint_folder(trainer) / name
    trainer.save_checkpoint(path)
    return path
