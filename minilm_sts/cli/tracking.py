"""Experiment tracking: W&B that never blocks, the full CLI config in the run, speed, and the cosine picture."""

from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from minilm_sts._compat import drop_unset_wandb_anonymous
from minilm_sts.cli.plots import save_cosine_label_picture
from minilm_sts.training.run_folder import checkpoint_folder, run_folder

WANDB_HOST = "api.wandb.ai"


def has_wandb_credentials() -> bool:
    """True when wandb could log in without asking: an API key in the environment or a `wandb login` entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbRunLogger(WandbLogger):
    """Lightning's WandbLogger, online when credentials exist and offline otherwise, never prompting.

    `offline=None` (the default) decides from the credentials; WANDB_MODE, when set, is left to wandb.
    """

    def __init__(self, project: str = "minilm-sts", save_dir: str = "runs", offline: Optional[bool] = None, **kwargs):
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not has_wandb_credentials()
            if offline:
                rank_zero_info(
                    f"W&B: no credentials (WANDB_API_KEY or `wandb login`), so this run logs offline under "
                    f"{save_dir}/wandb/. Upload it later with `wandb sync {save_dir}/wandb/offline-run-*`."
                )
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
        drop_unset_wandb_anonymous(self)


def wandb_run_line(trainer: L.Trainer) -> Optional[str]:
    """Where the run's W&B record is: its URL, or for an offline run the command that uploads it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and not logger.experiment.disabled:
            run = logger.experiment
            return (f"W&B run (offline): upload it with `wandb sync {run.sync_dir}`" if run.offline
                    else f"W&B run: {run.url}")
    return None


class SaveConfigToLoggers(SaveConfigCallback):
    """Save the whole resolved LightningCLI config as config.yaml in the run's own folder (Lightning's default
    place, `trainer.log_dir`, is runs/ for W&B, shared by every run) and into the W&B run config (Lightning does
    not: Lightning-AI/pytorch-lightning#19728). Runs on global rank zero."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / self.config_filename, skip_none=False, overwrite=self.overwrite,
                         multifile=self.multifile)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": self.config.as_dict()}, allow_val_change=True)


class TrainingSpeed(L.Callback):
    """Logs pairs/s and real (unpadded) tokens/s per training step, and peak GPU memory on CUDA."""

    def __init__(self):
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        pairs = len(batch["labels"])
        speed = {"train/pairs_per_sec": pairs / seconds, "train/tokens_per_sec": len(batch["input_ids"]) / seconds}
        if pl_module.device.type == "cuda":
            speed["train/peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(speed, batch_size=pairs)


class CosineLabelPicture(L.Callback):
    """At each validation, a picture of cosine against label for the monitored set: saved as PNG next to the
    checkpoints and logged to W&B as `val/cosine_vs_label`. It is drawn once the validation's metrics are
    final (`on_validation_end`), so it shows this validation's scores and Spearman."""

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sets = pl_module.latest_evaluation.get("val")
        if trainer.sanity_checking or not sets:
            return
        scored = next(iter(sets.values()))
        cosine, labels = scored.cosine.numpy(), scored.labels.numpy()
        title = (f"validation: cosine vs label at step {trainer.global_step}, "
                 f"spearman {scored.metrics['spearman_cosine']:.4f}")
        name = f"cosine_vs_label_step{trainer.global_step}.png"
        path = save_cosine_label_picture(cosine, labels, title, checkpoint_folder(trainer) / name)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"val/cosine_vs_label": wandb.Image(str(path)),
                                       "trainer/global_step": trainer.global_step})
