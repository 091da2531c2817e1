"""Callbacks the recipes use: export of the best checkpoint at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


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

        checkpoint = trainer.checkpoint_callback
        source = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else ""
        if not source:
            raise RuntimeError("ExportBest needs a saved checkpoint; enable checkpointing")
        out = export_with_card(Path(source), Path(self.dirpath), overwrite=self.overwrite)
        rank_zero_info(f"Exported {source} to {out}")
