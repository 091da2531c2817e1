"""`python -m minilm_sts fit|validate|test` (LightningCLI), plus `export`, `predict`, `build-pairs` and
`mine-negatives`. A mistake in what the user gave ends any of them with one message."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from minilm_sts.cli.lightning_cli import DEFAULT_RECIPE, SUBCOMMANDS, TRAINER_DEFAULTS, MiniLMCLI, uses_embedded_recipe
from minilm_sts.cli.recipes import with_recipe_paths
from minilm_sts.cli.tracking import SaveConfigToLoggers
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.errors import UserInputError
from minilm_sts.serving.export import export_with_card
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

USER_ERROR_EXIT = 2  # as for a command-line mistake that the parser catches


def export_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m minilm_sts export",
                                     description="Write a checkpoint as a folder that sentence-transformers loads.")
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by fit")
    parser.add_argument("out_dir", type=Path, help="the folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    parser.add_argument("--onnx", action="store_true",
                        help="also write onnx/model.onnx (sentence-transformers' backend=\"onnx\"), checked against "
                             "PyTorch; needs the onnx extra")
    parser.add_argument("--onnx-int8", action="store_true",
                        help="--onnx, plus its int8 dynamic quantization as onnx/model_qint8_<arch>.onnx")
    options = parser.parse_args(args)
    out_dir = export_with_card(options.checkpoint, options.out_dir, options.overwrite, options.onnx, options.onnx_int8)
    print(f"Exported to {out_dir}")


def not_a_cloud_tip(record: logging.LogRecord) -> bool:
    """False for Lightning's advertisements of its cloud logger and model registry, printed by every Trainer."""
    return not str(record.msg).startswith("💡 Tip: For seamless cloud")


def quiet_known_noise() -> None:
    """Silence what every run printed and no user can act on, each filter as narrow as its message."""
    # Lightning's CombinedLoader builds a torch LeafSpec, which torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    from lightning_utilities.core import rank_zero

    rank_zero.log.addFilter(not_a_cloud_tip)  # adding the same filter again changes nothing


def run_command(command_line: list[str], from_argv: bool) -> MiniLMCLI | None:
    if command_line[:1] == ["export"]:
        return export_command(command_line[1:])
    if command_line[:1] == ["build-pairs"]:
        from minilm_sts.data.stackexchange import build_pairs_command

        return build_pairs_command(command_line[1:])
    if command_line[:1] == ["mine-negatives"]:
        from minilm_sts.cli.mine_negatives import mine_negatives_command

        return mine_negatives_command(command_line[1:])
    if command_line[:1] == ["predict"]:
        from minilm_sts.serving.predict import predict_command

        return predict_command(command_line[1:])
    recipe = [DEFAULT_RECIPE] if uses_embedded_recipe(command_line) else []
    return MiniLMCLI(
        SentenceEncoderTraining,
        PairDataModule,
        command_line=command_line,
        args=None if from_argv else command_line,  # None: LightningCLI reads sys.argv (given both, it warns)
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # saved in the run's own folder instead
        auto_configure_optimizers=False,  # the module's per-step schedule is the recipe
        parser_kwargs={command: {"default_config_files": recipe} for command in SUBCOMMANDS},
    )


def main(args: list[str] | None = None) -> MiniLMCLI | None:
    """Run a command. A UserInputError prints its message alone and exits with status 2; `--debug` or
    MINILM_STS_DEBUG=1 shows its traceback instead. Any other exception keeps its traceback."""
    command_line = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in command_line or os.environ.get("MINILM_STS_DEBUG", "") not in ("", "0")
    command_line = [arg for arg in command_line if arg != "--debug"]
    quiet_known_noise()
    try:
        command_line = with_recipe_paths(command_line)
        if args is None:
            sys.argv[1:] = command_line
        return run_command(command_line, from_argv=args is None)
    except UserInputError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
