"""The callbacks the command-line recipes add: the start-up line naming the bound that ends a fit, `last.ckpt`
(not written by the validation before training), and `last.ckpt` saved on SIGTERM (preemption) from which a resume
matches an uninterrupted run."""

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from minilm_sts.cli.callbacks import training_length
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.training.callbacks.checkpoints import LastCheckpoint, SaveOnTerminate
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import attached, run


def test_the_start_up_line_names_the_bound_that_ends_the_run():
    assert training_length(40, -1, 7) == "Training stops after 40 steps (max_steps; an epoch is 7 steps)"
    assert training_length(-1, 2, 7) == "Training stops after 2 epochs, 14 steps (max_epochs; an epoch is 7 steps)"
    assert training_length(40, 1, 7).startswith("Training stops after 7 steps: max_epochs=1 comes before max_steps=40")
    assert training_length(10, 3, 7).startswith("Training stops after 10 steps: max_steps=10 comes before max_epochs=3")


class SigtermAtStep(L.Callback):
    """A real SIGTERM to this process at a given step; Lightning's handler stops after the current batch."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_and_resume_matches(tiny_model_dir, pair_files, tmp_path):
    full, _ = run(tiny_model_dir, pair_files, tmp_path / "full")
    with pytest.raises(SIGTERMException):
        run(tiny_model_dir, pair_files, tmp_path / "part", callbacks=[SigtermAtStep(8), SaveOnTerminate()],
            checkpoint_every=100)
    saved = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 8  # saved on the way out, not at a periodic checkpoint
    resumed, trainer = run(tiny_model_dir, pair_files, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert trainer.global_step == 10
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


class LastCheckpointBeforeFirstStep(L.Callback):
    def __init__(self, path):
        self.path, self.existed = path, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == 0:
            self.existed = self.path.exists()


def test_last_checkpoint_is_not_written_by_the_validation_before_training(tiny_model_dir, pair_files, tmp_path):
    probe = LastCheckpointBeforeFirstStep(tmp_path / "last.ckpt")
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)  # guarded
    trainer = L.Trainer(max_steps=1, callbacks=[probe, LastCheckpoint(dirpath=tmp_path, every_n_train_steps=None)],
                        logger=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(SentenceEncoderTraining(pretrained=str(tiny_model_dir)), data)
    assert "stsb" in attached(trainer, RunRecord).record["before_training"]  # the validation before training ran
    assert probe.existed is False  # and wrote nothing: no step was trained
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1  # the end of training did
