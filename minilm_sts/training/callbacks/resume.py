"""A resumed fit continues the random stream where its checkpoint left it."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from minilm_sts.model.checkpoint import LEGACY_RESUME_KEY


class RandomStreamOnResume(L.Callback):
    """Saves the random state (torch's CPU and CUDA generators, which dropout draws from) in every checkpoint
    and, when a fit resumes from one, restores it as training starts, so a resumed run ends with the same
    weights as an uninterrupted one."""

    def __init__(self):
        self._restore: Optional[dict] = None

    def state_dict(self) -> dict:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": states}

    def load_state_dict(self, state: dict) -> None:
        self._restore = state["rng"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if LEGACY_RESUME_KEY in checkpoint:  # an older checkpoint; a newer one goes through load_state_dict
            self._restore = checkpoint[LEGACY_RESUME_KEY]["rng"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restore is None:
            return
        torch.set_rng_state(self._restore["cpu"])
        if "cuda" in self._restore and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._restore["cuda"])
        self._restore = None
