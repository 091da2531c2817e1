"""`python -m minilm_sts fit|validate|test|predict`: LightningCLI with the reference's training defaults."""

from __future__ import annotations

from importlib import resources

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from minilm_sts.datamodule import PairDataModule
from minilm_sts.module import SentenceEmbedder

# The embedded default recipe: fine-tune on the packaged STS Benchmark (configs/stsb.yaml points here).
DEFAULT_RECIPE = str(resources.files("minilm_sts") / "recipes" / "stsb.yaml")

SUBCOMMANDS = ("fit", "validate", "test", "predict")

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "check_val_every_n_epoch": None,  # count val_check_interval in optimizer steps across epochs, like HF "steps"
    "val_check_interval": 500,
    "default_root_dir": "runs",
    "log_every_n_steps": 1,  # train/loss at every step
}


class MiniLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/spearman_cosine",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "step{step}-spearman{val/spearman_cosine:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        # Precision follows the hardware unless the recipe or the command line chose one.
        trainer = self.config[self.subcommand].trainer
        if trainer.precision is None:
            trainer.precision = "16-mixed" if torch.cuda.is_available() else "32-true"


def main(args: list[str] | None = None) -> MiniLMCLI:
    return MiniLMCLI(
        SentenceEmbedder,
        PairDataModule,
        args=args,
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},  # a second run in the same folder must not fail
        auto_configure_optimizers=False,  # the module's per-step schedule is the recipe
        parser_kwargs={command: {"default_config_files": [DEFAULT_RECIPE]} for command in SUBCOMMANDS},
    )
