"""Resume: stopping mid-epoch and continuing from last.ckpt ends with the same weights and metrics as an
uninterrupted run (CPU, same seed), at the same step and in the same data order."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minilm_sts.datamodule import PairBatches, PairDataModule
from minilm_sts.module import SentenceEmbedder


class Crash(Exception):
    pass


class CrashAtStep(L.Callback):
    """Dies at the end of a step, before that step's checkpoint is written (Lightning runs checkpoint
    callbacks last), like a process killed between two saves."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash


def run(model_dir, pair_files, root, ckpt_path=None, callbacks=(), checkpoint_every=1):
    L.seed_everything(42)
    model = SentenceEmbedder(pretrained=str(model_dir), lr=1e-3)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=True, every_n_train_steps=checkpoint_every)
    trainer = L.Trainer(max_epochs=2, val_check_interval=3, check_val_every_n_epoch=None, logger=False,
                        callbacks=[*callbacks, checkpoint], enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def test_resume_mid_epoch_equals_uninterrupted(tiny_model_dir, pair_files, tmp_path):
    full, full_trainer = run(tiny_model_dir, pair_files, tmp_path / "full")
    assert full_trainer.global_step == 10  # 40 pairs, batch 8, 2 epochs

    with pytest.raises(Crash):  # dies at step 8, in epoch 2, after last.ckpt was written at step 7
        run(tiny_model_dir, pair_files, tmp_path / "part", callbacks=[CrashAtStep(8)])
    assert torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["global_step"] == 7
    resumed, resumed_trainer = run(tiny_model_dir, pair_files, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert resumed_trainer.global_step == 10

    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [r["step"] for r in resumed.run_record["log"]] == [r["step"] for r in full.run_record["log"]] == [3, 6, 9]
    for a, b in zip(full.run_record["log"], resumed.run_record["log"]):
        assert abs(a["spearman_cosine"] - b["spearman_cosine"]) <= 1e-6
        assert abs(a["training_loss"] - b["training_loss"]) <= 1e-6


def test_batch_order_depends_on_seed_and_epoch_and_skips_on_resume():
    batches = PairBatches([10], 3, seed=42, mode="round_robin", batches_done=lambda: 2)
    epoch0 = list(batches)
    assert len(batches) == len(epoch0) == 4 and sorted(i for b in epoch0 for i in b) == list(range(10))
    batches.sampler.set_epoch(1)  # where Lightning calls it
    epoch1 = list(batches)
    assert epoch1 != epoch0
    state = batches.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}
    again = PairBatches([10], 3, seed=42, mode="round_robin", batches_done=lambda: 0)
    again.load_state_dict(state)
    again.set_epoch(1)
    assert list(again) == epoch1[2:]
    assert list(again) == epoch1  # only the first pass after a resume skips


def test_round_robin_alternates_and_stops_with_the_smallest_dataset():
    batches = PairBatches([10, 4, 7], 2, seed=0, mode="round_robin", batches_done=lambda: 0)
    plan = list(batches)
    owner = [0 if b[0] < 10 else 1 if b[0] < 14 else 2 for b in plan]
    assert owner == [0, 1, 2, 0, 1, 2] and len(batches) == 6  # the 4-pair set has 2 batches
    assert all(len({0 if i < 10 else 1 if i < 14 else 2 for i in b}) == 1 for b in plan)  # one dataset per batch


def test_proportional_visits_every_batch_of_every_dataset():
    batches = PairBatches([10, 4, 7], 2, seed=0, mode="proportional", batches_done=lambda: 0)
    plan = list(batches)
    assert len(plan) == len(batches) == 5 + 2 + 4
    assert sorted(i for b in plan for i in b) == list(range(21))
    assert plan == list(PairBatches([10, 4, 7], 2, seed=0, mode="proportional", batches_done=lambda: 0))
