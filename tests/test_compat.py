"""Each framework internal that minilm_sts._compat relies on still exists and behaves as assumed, and pyproject
bounds torch, Lightning and transformers to versions this suite has run with. An upgrade that breaks one fails
here by name."""

import csv
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from packaging.requirements import Requirement
from torch.utils.data import DataLoader

from minilm_sts import _compat as compat
from minilm_sts.data.batching import PairBatches
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import ROOT


def test_fused_adamw_unscales_in_its_step_and_plain_adamw_does_not():
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    assert callable(_optimizer_handles_unscaling)
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    assert compat.optimizer_unscales_in_step(torch.optim.AdamW(parameters, fused=True))
    assert not compat.optimizer_unscales_in_step(torch.optim.AdamW(parameters, foreach=False))


class Probe(L.Callback):
    """Records what the compat functions say at each training batch's end and at each validation's end."""

    def __init__(self):
        self.at_batch_end, self.at_validation = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at_batch_end.append((batch_idx, compat.epoch_batch_index(trainer), compat.epoch_batches_fetched(trainer),
                                  compat.epoch_batches_trained(trainer), compat.step_loss(trainer, outputs).item()))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # (index now, index of the training batch just trained)
            self.at_validation.append((compat.epoch_batch_index(trainer), self.at_batch_end[-1][0]))


class LossKeepingEmbedder(SentenceEncoderTraining):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.returned.append(loss.item())
        return loss


def test_loop_progress_and_step_loss_read_as_assumed(tiny_model_dir, pair_files):
    """5 batches an epoch, 2 accumulated per step: the batch index, the fetched and trained counts include the
    current batch, a validation between batches sees the last one's index, and the hooks' loss is training_step's."""
    model = LossKeepingEmbedder(pretrained=str(tiny_model_dir))
    model.returned = []
    probe = Probe()
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=2, val_check_interval=2, check_val_every_n_epoch=None,
                        callbacks=[probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    assert [row[:4] for row in probe.at_batch_end] == [(i, i, i + 1, i + 1) for i in range(5)]
    assert [row[4] for row in probe.at_batch_end] == pytest.approx(model.returned, rel=1e-6)
    assert probe.at_validation[0][0] == probe.at_validation[0][1] < 4  # a validation inside the epoch


class ValidateAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        compat.validate_within_fit(trainer)
        self.stage_and_mode_after = (trainer.training, trainer.validating, pl_module.training)


def test_validate_within_fit_logs_a_validation_at_step_0_and_returns_to_training(tiny_model_dir, pair_files, tmp_path):
    probe = ValidateAtStart()
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    trainer = L.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, callbacks=[probe],
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0)
    trainer.fit(SentenceEncoderTraining(pretrained=str(tiny_model_dir)), data)
    assert probe.stage_and_mode_after == (True, False, True)
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows if row.get("val/spearman_cosine")]
    assert steps[0] == 0 and len(steps) == 2  # before the first step, then after the second
    assert trainer.global_step == 2


def test_lightning_sets_the_epoch_of_a_batch_sampler_through_receive_set_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    batches = PairBatches([10], 3, seed=0, mode="round_robin", batches_done=lambda: 0)
    _set_sampler_epoch(DataLoader(range(10), batch_sampler=batches), 3)
    assert batches.epoch == 3


def test_onednn_linear_equals_the_default_linear():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((7, 16), (24, 16), (24,)))
    with torch.no_grad():
        assert torch.allclose(compat.onednn_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)


def test_native_bf16_is_read_from_the_cpus_instruction_sets():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if not flags:  # not Linux: the answer is oneDNN's or torch's own, which this test cannot cross-check
        assert isinstance(compat.cpu_has_native_bf16(), bool)
        return
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    if "avx2" in flags:  # x86: torch's reading must agree with the kernel's list of CPU flags
        assert compat.cpu_has_native_bf16() == native
    else:
        assert isinstance(compat.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize("package", ["torch", "lightning", "transformers"])
def test_pyproject_bounds_the_framework_above_and_admits_the_installed_version(package):
    pyproject = (ROOT / "pyproject.toml").read_text()
    (line,) = re.findall(rf'^\s*"({package}\s*[<>=!~][^"]*)"', pyproject, flags=re.MULTILINE)
    specifier = Requirement(line).specifier
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in specifier), f"{line}: no upper bound"
    installed = getattr(__import__(package), "__version__").split("+")[0]
    assert specifier.contains(installed), f"{package} {installed} is outside {line}"


def test_save_last_checkpoint_writes_last_ckpt_now(tiny_model_dir, pair_files, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[checkpoint], enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, data)
    (tmp_path / "last.ckpt").unlink()
    compat.save_last_checkpoint(checkpoint, trainer)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1


def test_wandb_loggers_init_arguments_are_the_dict_assumed(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" in logger._wandb_init and logger._wandb_init["anonymous"] is None
    compat.drop_unset_wandb_anonymous(logger)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"]


def test_a_loaded_datasets_table_has_a_content_fingerprint():
    from datasets import Dataset

    table = Dataset.from_dict({"a": ["x", "y"]})
    fingerprint = compat.hf_dataset_fingerprint(table)
    assert isinstance(fingerprint, str) and fingerprint
    assert compat.hf_dataset_fingerprint(table.map(lambda row: {"a": row["a"] + "!"})) != fingerprint


def test_lightning_cli_builds_its_trainer_through_the_hook_trainer_callbacks_overrides():
    import inspect

    from lightning.pytorch.cli import LightningCLI

    assert list(inspect.signature(LightningCLI._instantiate_trainer).parameters) == ["self", "config", "callbacks"]
    assert compat.TrainerCallbacksCLI._instantiate_trainer is not LightningCLI._instantiate_trainer


class LoggingStepProbe(L.Callback):
    def __init__(self):
        self.logging_steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if compat.is_logging_step(trainer):
            self.logging_steps.append(trainer.global_step)


def test_is_logging_step_is_true_exactly_every_log_every_n_steps(tiny_model_dir, pair_files, tmp_path):
    probe = LoggingStepProbe()
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=2, forgetting_guard=False)
    trainer = L.Trainer(max_steps=12, log_every_n_steps=4, callbacks=[probe], logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(SentenceEncoderTraining(pretrained=str(tiny_model_dir)), data)
    assert probe.logging_steps == [4, 8, 12]  # global_step after the optimizer step of batches 3, 7 and 11


def test_loss_scale_is_the_scalers_own_tensor_and_follows_a_skipped_step():
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert compat.loss_scale(scaler) is None  # before the first scaled loss
    scaler.scale((parameter * float("inf")).sum()).backward()
    scale = compat.loss_scale(scaler)
    assert isinstance(scale, torch.Tensor) and scale.item() == scaler.get_scale() == 1024.0
    scaler.step(optimizer)
    scaler.update()
    assert compat.loss_scale(scaler).item() == 512.0  # the step with inf gradients was skipped and the scale halved


def test_a_recompile_beyond_the_limit_raises_under_no_silent_recompile_fallback():
    silent = torch.compile(lambda x: x * 2, dynamic=False, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        silent(torch.ones(2))
        assert silent(torch.ones(3)).tolist() == [2.0] * 3  # torch's default: eager from here on, with a log line
    compiled = torch.compile(lambda x: x * 3, dynamic=False, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1), compat.no_silent_recompile_fallback():
        compiled(torch.ones(2))
        with pytest.raises(Exception, match="recompile_limit|cache_size_limit|recompil"):
            compiled(torch.ones(3))  # a second shape needs a second compilation: over the limit of 1
