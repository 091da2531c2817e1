"""`python -m minilm_sts fit|validate|test` (LightningCLI, with the reference's training defaults), plus
`export` and `predict`."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from minilm_sts.callbacks import ExportBest, SaveOnTerminate
from minilm_sts.datamodule import PairDataModule
from minilm_sts.module import SentenceEmbedder
from minilm_sts.tracking import CosineLabelPicture, SaveConfigToLoggers, TrainingSpeed, WandbRunLogger

# The embedded default recipe: fine-tune on the packaged STS Benchmark (configs/stsb.yaml points here).
DEFAULT_RECIPE = str(resources.files("minilm_sts") / "recipes" / "stsb.yaml")

SUBCOMMANDS = ("fit", "validate", "test")

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "check_val_every_n_epoch": None,  # count val_check_interval in optimizer steps across epochs, like HF "steps"
    "val_check_interval": 500,
    "default_root_dir": "runs",
    "log_every_n_steps": 1,  # train/loss at every step
    "use_distributed_sampler": False,  # PairDataModule shards its own batches and evaluation sets
    "logger": lazy_instance(WandbRunLogger),  # --trainer.logger false turns logging off
    "callbacks": [lazy_instance(TrainingSpeed), lazy_instance(CosineLabelPicture), lazy_instance(SaveOnTerminate)],
}


class MiniLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict:
        # `predict` is our own command (files in, embeddings or scores out), dispatched before LightningCLI.
        return {name: methods for name, methods in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/spearman_cosine",
            "checkpoint.mode": "max",
            "checkpoint.save_last": False,  # last.ckpt has one writer, below: two would make last-v1.ckpt
            "checkpoint.filename": "step{step}-spearman{val/spearman_cosine:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(ModelCheckpoint, "periodic_checkpoint")
        parser.set_defaults({  # last.ckpt at every validation and every N steps, for resuming long runs
            "periodic_checkpoint.save_top_k": 0,
            "periodic_checkpoint.save_last": True,
            "periodic_checkpoint.every_n_train_steps": 200,
        })
        parser.add_lightning_class_args(ExportBest, "export")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        # Precision follows the hardware unless the recipe or the command line chose one.
        if config.trainer.precision is None:
            config.trainer.precision = "16-mixed" if torch.cuda.is_available() else "32-true"
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(newest_last_checkpoint(Path(config.trainer.default_root_dir or ".")))


def newest_last_checkpoint(root: Path) -> Path:
    """`--ckpt_path last`: the most recently written last.ckpt under the run folder. (Lightning would only look
    in the new run's own checkpoint folder, which a new W&B run id makes empty.)"""
    candidates = sorted(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {root.resolve()}; give the checkpoint's path")
    return candidates[-1]


def export_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m minilm_sts export",
                                     description="Write a checkpoint as a folder that sentence-transformers loads.")
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by fit")
    parser.add_argument("out_dir", type=Path, help="the folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    options = parser.parse_args(args)
    from minilm_sts.export import export_with_card

    print(f"Exported to {export_with_card(options.checkpoint, options.out_dir, options.overwrite)}")


def main(args: list[str] | None = None) -> MiniLMCLI | None:
    command_line = sys.argv[1:] if args is None else list(args)
    if command_line[:1] == ["export"]:
        return export_command(command_line[1:])
    if command_line[:1] == ["build-pairs"]:
        from minilm_sts.stackexchange import build_pairs_command

        return build_pairs_command(command_line[1:])
    if command_line[:1] == ["predict"]:
        from minilm_sts.predict import predict_command

        return predict_command(command_line[1:])
    return MiniLMCLI(
        SentenceEmbedder,
        PairDataModule,
        args=args,  # None: LightningCLI reads sys.argv itself (given both, it warns on every run)
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},  # a second run in the same folder must not fail
        auto_configure_optimizers=False,  # the module's per-step schedule is the recipe
        parser_kwargs={command: {"default_config_files": [DEFAULT_RECIPE]} for command in SUBCOMMANDS},
    )
