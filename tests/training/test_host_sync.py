"""A steady-state training step reads nothing back from the training device, except at logging steps.

On a GPU every read-back (`.item()`, `bool(t)`, `.cpu()`, ...) makes the host wait until the device has run all
the work queued so far, so a step that reads one cannot queue the next while the device computes. Here on the
CPU the same reads are counted, as the operator that performs them (`aten._local_scalar_dense`) and as calls of
the Tensor methods that read values or copy them to the host, over whole loop iterations of a real fit.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.training.callbacks.progress import ShowsLoggedLoss
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

READ_BACK_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
LOG_EVERY = 5
STEPS = 16


class HostReads(TorchDispatchMode):
    """Counts read-backs while active: the scalar-read operator, and the Tensor methods above (patched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.count = 0
        for name in READ_BACK_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, method):
        reads = self

        def read_back(tensor, *args, **kwargs):
            if reads.active:
                reads.count += 1
            return method(tensor, *args, **kwargs)

        return read_back

    active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def reads_per_iteration(monkeypatch, tiny_model_dir, pair_files, tmp_path, **trainer_options) -> list[int]:
    """Read-backs in each training-loop iteration of a fit (fetch, step, optimizer, hooks, logging, progress
    bar), with the batches made in a loader worker as on a GPU machine."""
    reads, per_iteration = HostReads(monkeypatch), []
    advance, advance_end = _TrainingEpochLoop.advance, _TrainingEpochLoop.on_advance_end

    def counted(part, starts: bool, ends: bool):
        def run_counted(loop, data_fetcher):
            if starts:
                reads.count = 0
            reads.active = True
            try:
                with reads:
                    return part(loop, data_fetcher)
            finally:
                reads.active = False
                if ends:
                    per_iteration.append(reads.count)

        return run_counted

    # One iteration: advance (fetch, step, optimizer, hooks, logging, progress bar), then on_advance_end (the
    # scheduler, validation if due, the loggers' save).
    monkeypatch.setattr(_TrainingEpochLoop, "advance", counted(advance, starts=True, ends=False))
    monkeypatch.setattr(_TrainingEpochLoop, "on_advance_end", counted(advance_end, starts=False, ends=True))
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), max_grad_norm=1.0)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=2, num_workers=1,
                          forgetting_guard=False)  # 20 batches: the 16 steps stay in one epoch
    trainer = L.Trainer(max_steps=STEPS, log_every_n_steps=LOG_EVERY, logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, limit_val_batches=0, **trainer_options)
    trainer.fit(model, data)
    return per_iteration


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_no_read_back_outside_logging_steps(monkeypatch, tiny_model_dir, pair_files, tmp_path, precision):
    # fp16 on the CPU needs its GradScaler given: its loss scaling and skipped-step count are checked too.
    options = ({"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
               if precision == "16-mixed" else {"precision": precision})
    counts = reads_per_iteration(monkeypatch, tiny_model_dir, pair_files, tmp_path, **options)
    assert len(counts) == STEPS
    logging = {step for step in range(STEPS) if (step + 1) % LOG_EVERY == 0}
    steady = range(1, STEPS)  # the first iteration also sets up the loader and the guard's device tensors
    assert [counts[step] for step in steady if step not in logging] == [0] * (len(steady) - len(logging))
    # At a logging step: the non-finite guard's one number, the progress bar's loss and the loggers reading the
    # values logged (each read counts twice where both the method and the operator are seen).
    assert all(0 < counts[step] <= 12 for step in logging), counts


@pytest.mark.parametrize("bar", [TQDMProgressBar(refresh_rate=3), None], ids=["tqdm", "lightning's default"])
def test_the_progress_bar_shows_the_loss_read_at_the_last_logging_step(tiny_model_dir, pair_files, tmp_path, bar):
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=2, forgetting_guard=False)
    trainer = L.Trainer(max_steps=7, log_every_n_steps=LOG_EVERY, logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, limit_val_batches=0, callbacks=[bar] if bar else None)
    trainer.fit(model, data)
    shown = trainer.progress_bar_callback
    assert isinstance(shown, ShowsLoggedLoss) and len([c for c in trainer.callbacks if isinstance(c, ProgressBar)]) == 1
    assert bar is None or (isinstance(shown, TQDMProgressBar) and shown.refresh_rate == 3)
    assert shown.get_metrics(trainer, model)["loss"] == f"{float(trainer.logged_metrics['train/loss']):.4g}"
