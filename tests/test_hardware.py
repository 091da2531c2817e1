"""Precision by what the CPU can do, and the machine that the run record, the card and the benchmarks name."""

import pytest
import torch

from minilm_sts.cli import lightning_cli as cli_module
from minilm_sts.cli.commands import main
from minilm_sts.hardware import EMULATED_BF16_SLOWDOWN, cpu_precision, describe_machine, machine
from minilm_sts.model.checkpoint import read_run_record

from helpers import ROOT, write_tsv


@pytest.mark.parametrize("asked", ["16-mixed", "bf16-mixed", "16", "bf16"])
def test_a_recipes_mixed_precision_trains_in_fp32_on_a_cpu_without_native_bf16(asked):
    precision, message, is_warning = cpu_precision(asked, asked_on_command_line=False, native_bf16=False)
    assert precision == "32-true" and not is_warning
    assert message.startswith(f"Precision: the recipe asks for {asked}; training in 32-true")
    assert "no native bf16" in message and EMULATED_BF16_SLOWDOWN in message


def test_mixed_precision_given_on_the_command_line_is_kept_with_a_warning():
    precision, message, is_warning = cpu_precision("bf16-mixed", asked_on_command_line=True, native_bf16=False)
    assert precision == "bf16-mixed" and is_warning
    assert "kept as given" in message and f"{EMULATED_BF16_SLOWDOWN} slower" in message


@pytest.mark.parametrize("on_command_line", [False, True])
def test_nothing_changes_where_the_cpu_has_native_bf16(on_command_line):
    assert cpu_precision("16-mixed", on_command_line, native_bf16=True) == ("16-mixed", None, False)


@pytest.mark.parametrize("asked", ["32-true", "32", "64-true"])
def test_full_precision_is_never_changed(asked):
    assert cpu_precision(asked, False, native_bf16=False) == (asked, None, False)


class Trainer:  # what settle_precision reads of the trainer's config
    def __init__(self, precision, accelerator="auto"):
        self.precision, self.accelerator = precision, accelerator


def test_settle_precision_leaves_a_gpu_run_alone(monkeypatch):
    monkeypatch.setattr(cli_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(cli_module, "trains_on_cpu", lambda accelerator: False)
    gpu = Trainer("16-mixed")
    cli_module.settle_precision(gpu, [])
    assert gpu.precision == "16-mixed"
    unset = Trainer(None)
    cli_module.settle_precision(unset, [])
    assert unset.precision == "16-mixed"


def test_settle_precision_on_a_cpu(monkeypatch):
    monkeypatch.setattr(cli_module, "cpu_has_native_bf16", lambda: False)
    from_recipe, typed = Trainer("16-mixed", "cpu"), Trainer("bf16-mixed", "cpu")
    cli_module.settle_precision(from_recipe, ["fit", "--config", "duplicates.yaml"])
    cli_module.settle_precision(typed, ["fit", "--trainer.precision=bf16-mixed"])
    assert (from_recipe.precision, typed.precision) == ("32-true", "bf16-mixed")
    unset = Trainer(None, "cpu")
    cli_module.settle_precision(unset, [])
    assert unset.precision == "32-true"


def test_machine_is_described_in_plain_values():
    found = machine()
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(found["native_bf16"], bool) and found["threads"] == torch.get_num_threads() and found["cpu"]
    line = describe_machine({"cpu": "AMD EPYC", "cpu_capability": "AVX2", "native_bf16": False, "threads": 2})
    assert line == "AMD EPYC (AVX2, no native bf16), 2 threads"


def test_the_duplicates_recipe_on_a_cpu_without_native_bf16_says_so_and_records_what_ran(
        tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_module, "cpu_has_native_bf16", lambda: False)
    said = []
    monkeypatch.setattr(cli_module, "rank_zero_info", said.append)  # the start-up lines, as Lightning's log gets them
    monkeypatch.chdir(tmp_path)
    rows = [[f"a {i} man", f"the {i} dog", float(i % 2)] for i in range(24)]
    train, dev = write_tsv(tmp_path / "train.tsv", rows), write_tsv(tmp_path / "dev.tsv", rows[:8])
    run = main(["fit", "--config", str(ROOT / "configs/duplicates.yaml"),
                          "--model.pretrained", str(tiny_model_dir),
                          "--data.train_path", f"{{duplicates: {train}, stsb: builtin:stsb/train}}",
                          "--data.val_path", f"{{duplicates: {dev}, stsb: builtin:stsb/dev}}",
                          "--trainer.max_steps", "2", "--trainer.logger", "false",
                          "--trainer.enable_progress_bar", "false"])
    assert run.trainer.precision == "32-true"
    precision_lines = [line for line in said if line.startswith("Precision:")]
    assert len(precision_lines) == 1 and "asks for 16-mixed; training in 32-true" in precision_lines[0]
    record = read_run_record(torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True))
    assert record["trainer"]["precision"] == "32-true"
    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
