"""`python -m minilm_sts fit|validate|test` (LightningCLI, with the reference's training defaults), plus
`export`, `predict` and `build-pairs`. A mistake in what the user gave ends any of them with one message."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minilm_sts._compat import TrainerCallbacksCLI, cpu_has_native_bf16
from minilm_sts.cli.callbacks import ExportBest, FitPlan
from minilm_sts.cli.recipes import recipe_path
from minilm_sts.cli.tracking import (
    CosineLabelPicture,
    TrainingSpeed,
    WandbRunLogger,
    wandb_run_line,
)
from minilm_sts.errors import UserInputError
from minilm_sts.hardware import cpu_precision
from minilm_sts.model.checkpoint import check_checkpoint
from minilm_sts.training.callbacks.checkpoints import LastCheckpoint, SaveOnTerminate
from minilm_sts.training.callbacks.merge import MergeWithBase, merged_checkpoint
from minilm_sts.training.run_folder import run_folder

# The embedded default recipe: fine-tune on the packaged STS Benchmark (configs/stsb.yaml points here).
DEFAULT_RECIPE = recipe_path("stsb")
# Naming any of these means the user brings a recipe or data of their own: the embedded recipe then stays out,
# so no data set the user did not name (such as the STS-B test split) slips into the run.
OWN_RECIPE_OPTIONS = ("-c", "--config", "--data", "--data.train_path", "--data.val_path", "--data.test_path")

SUBCOMMANDS = ("fit", "validate", "test")

TRAINER_DEFAULTS = {
    "check_val_every_n_epoch": None,  # count val_check_interval in optimizer steps across epochs, like HF "steps"
    "val_check_interval": 500,
    "default_root_dir": "runs",
    "log_every_n_steps": 1,  # train/loss at every step
    # Lightning's summary is one row here, with "FLOPs: 0" (its counter cannot see the oneDNN inference path);
    # FitPlan states the parameter count instead.
    "enable_model_summary": False,
    "use_distributed_sampler": False,  # PairDataModule shards its own batches and evaluation sets
    "logger": lazy_instance(WandbRunLogger),  # --trainer.logger false turns logging off
    "callbacks": [lazy_instance(TrainingSpeed), lazy_instance(CosineLabelPicture), lazy_instance(SaveOnTerminate),
                  lazy_instance(FitPlan)],
}


def given(command_line: list[str], option: str) -> bool:
    """Whether the command line names `option` (as `--option value` or `--option=value`)."""
    return any(arg == option or arg.startswith(option + "=") for arg in command_line)


def uses_embedded_recipe(command_line: list[str]) -> bool:
    return not any(given(command_line, option) for option in OWN_RECIPE_OPTIONS)


class MiniLMCLI(TrainerCallbacksCLI, LightningCLI):
    def __init__(self, *args, command_line: list[str], **kwargs):
        self.command_line = command_line
        super().__init__(*args, **kwargs)

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
            "checkpoint.filename": None,  # named after the monitored metric: checkpoint_filename
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LastCheckpoint, "periodic_checkpoint")
        # Before export: callbacks run in this order, and export takes the merged model when there is one.
        parser.add_lightning_class_args(MergeWithBase, "merge")
        parser.set_defaults({"merge.enabled": False})  # a recipe turns it on (duplicates)
        parser.add_lightning_class_args(ExportBest, "export")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if uses_embedded_recipe(self.command_line):
            rank_zero_info(f"Recipe: the embedded STS-B default ({DEFAULT_RECIPE}); --config or --data.*_path "
                           "replace it with yours.")
        settle_precision(config.trainer, self.command_line)
        settle_training_length(config.trainer, self.command_line)
        if config.checkpoint.filename is None and config.checkpoint.monitor:
            config.checkpoint.filename = checkpoint_filename(config.checkpoint.monitor)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(newest_last_checkpoint(Path(config.trainer.default_root_dir or ".")))
        elif config.get("ckpt_path") and "://" not in config.ckpt_path and config.ckpt_path not in ("best", "hpc"):
            check_checkpoint(Path(config.ckpt_path))
        if config.trainer.enable_checkpointing is False and config.export.dirpath:
            raise UserInputError("--export.dirpath exports the best checkpoint, but --trainer.enable_checkpointing "
                                 "is false; drop one of them")

    def trainer_callbacks(self, config: dict, callbacks: list) -> list:
        # The checkpoint writers that add_arguments_to_parser always adds serve fit only (elsewhere, loading their
        # state from a checkpoint of another run makes Lightning warn that their folder changed), and none of
        # them with `--trainer.enable_checkpointing false`, which Lightning refuses alongside checkpoint callbacks.
        if self.subcommand != "fit" or config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            config["enable_checkpointing"] = False
        return callbacks

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(closing_summary(self.trainer), flush=True)


def settle_training_length(trainer, command_line: list[str]) -> None:
    """Which of max_steps and max_epochs bounds the run. Left unset, max_epochs is 1, or unbounded when
    max_steps is set. A bound given on the command line replaces the other kind of bound that a recipe set (as
    Hugging Face's max_steps overrides num_train_epochs); bounds given together stop at the first reached."""
    steps_given = given(command_line, "--trainer.max_steps") and trainer.max_steps not in (None, -1)
    epochs_given = given(command_line, "--trainer.max_epochs") and trainer.max_epochs not in (None, -1)
    if steps_given and not epochs_given:
        trainer.max_epochs = -1
    elif epochs_given and not steps_given:
        trainer.max_steps = -1
    if trainer.max_epochs is None:
        trainer.max_epochs = 1 if trainer.max_steps in (None, -1) else -1


def trains_on_cpu(accelerator) -> bool:
    """Whether the trainer will run on the CPU: asked for, or `auto` on a machine with no GPU."""
    if str(accelerator) == "cpu":
        return True
    return (str(accelerator) in ("auto", "None") and not torch.cuda.is_available()
            and not torch.backends.mps.is_available())


def settle_precision(trainer, command_line: list[str]) -> None:
    """Precision follows the hardware: unset, 16-mixed on a GPU and 32-true on a CPU; on a CPU without native
    bf16, a recipe's mixed precision becomes 32-true (hardware.cpu_precision), and the start-up log says so."""
    on_cpu = trains_on_cpu(trainer.accelerator)
    if trainer.precision is None:
        trainer.precision = "32-true" if on_cpu else "16-mixed"
    elif on_cpu:
        trainer.precision, message, is_warning = cpu_precision(
            trainer.precision, given(command_line, "--trainer.precision"), cpu_has_native_bf16())
        if message:
            (rank_zero_warn if is_warning else rank_zero_info)(message)


def checkpoint_filename(monitor: str) -> str:
    """The best checkpoints' file name pattern for a monitored key, `step<N>-<metric><value>` as in
    step180-spearman0.8568: the key without `val/` and `cosine`, any character a file name or Lightning's
    format field cannot take (`/` between a set and its metric, among others) turned into `-`, and `=` before
    the value when the name ends in a digit (quora-mrr@10=0.8412). A key that a format field cannot hold
    (`{}[]:`) leaves the value out."""
    label = re.sub(r"[^\w.@+-]", "-", monitor.removeprefix("val/").replace("_cosine", "").replace("cosine_", ""))
    if re.search(r"[{}\[\]:]", monitor):
        return f"step{{step}}-{label}"
    return f"step{{step}}-{label}{'=' if label[-1].isdigit() else ''}{{{monitor}:.4f}}"


def newest_last_checkpoint(root: Path) -> Path:
    """`--ckpt_path last`: the most recently written last.ckpt under the run folder. (Lightning would only look
    in the new run's own checkpoint folder, which a new W&B run id makes empty.)"""
    candidates = sorted(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserInputError(f"--ckpt_path last: no last.ckpt under {root.resolve()}; give the checkpoint's path")
    return candidates[-1]


def closing_summary(trainer) -> str:
    """What a fit made and what to run next, with the run's real paths."""
    folder = run_folder(trainer)
    lines = [f"Run folder: {folder}"]
    best_writer = next((c for c in trainer.checkpoint_callbacks if c.monitor and c.best_model_path), None)
    last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "")
    if best_writer:
        step = torch.load(best_writer.best_model_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        lines.append(f"Best checkpoint: {best_writer.best_model_path} ({best_writer.monitor} "
                     f"{float(best_writer.best_model_score):.4f} at step {step})")
    if last:
        lines.append(f"Last checkpoint: {last}")
    merged = merged_checkpoint(trainer)
    if merged:
        lines.append(f"Merged with the base: {merged} (the run's model; last.ckpt keeps the fine-tuned weights)")
    if not trainer.checkpoint_callbacks:
        lines.append("No checkpoints: --trainer.enable_checkpointing is false.")
    wandb_line = wandb_run_line(trainer)
    if wandb_line:
        lines.append(wandb_line)
    chosen = merged or (best_writer.best_model_path if best_writer else last)
    if chosen:
        test = shlex.join(["python", "-m", "minilm_sts", "test", "--config", str(folder / "config.yaml"),
                           "--ckpt_path", chosen])
        if not trainer.datamodule.sources["test"]:  # this run names no test set: the user brings one
            test += " --data.test_path <your test file>"
        export = shlex.join(["python", "-m", "minilm_sts", "export", chosen, str(folder / "model")])
        lines += ["Next:", f"  {test}", f"  {export}"]
    return "\n".join(lines)


