"""EMA through Lightning's EMAWeightAveraging: a fit ends holding the averaged weights, which differ from the raw
ones, its checkpoints and export hold them, and from the command line a merge with the base starts from them."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.model.checkpoint import ENCODER_PREFIX, read_run_record
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.export import export_with_card
from minilm_sts.training.callbacks.merge import interpolate
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import cli


def test_checkpoints_and_export_hold_the_averaged_weights(tiny_model_dir, pair_files, tmp_path):
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), lr=1e-3)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/spearman_cosine", mode="max", filename="best")
    trainer = L.Trainer(max_steps=3, val_check_interval=3, check_val_every_n_epoch=None, logger=False,
                        callbacks=[EMAWeightAveraging(decay=0.5), checkpoint], enable_progress_bar=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)  # saved at the last step's validation
    averaged, raw = saved["state_dict"], saved["current_model_state"]
    assert any(not torch.equal(averaged[key], raw[key]) for key in averaged)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in averaged.items())  # the fit ends on them
    exported = SentenceEncoder.from_pretrained(export_with_card(tmp_path / "best.ckpt", tmp_path / "model"))
    assert all(torch.equal(exported.state_dict()[key.removeprefix(ENCODER_PREFIX)], value)
               for key, value in averaged.items())


@pytest.mark.slow
def test_from_the_command_line_ema_feeds_the_merge(tiny_model_dir, pair_files, tmp_path):
    cli("fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
        "--data.val_path", str(pair_files["val"]), "--data.batch_size", "20", "--trainer.max_steps", "2",
        "--trainer.callbacks+=EMAWeightAveraging", "--trainer.callbacks.decay", "0.5", "--merge.enabled", "true",
        "--merge.alphas", "[0.5, 1.0]", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path)
    last = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert any(not torch.equal(last["state_dict"][key], value) for key, value in last["current_model_state"].items())
    merged = torch.load(next(tmp_path.rglob("merged-alpha*.ckpt")), weights_only=True)
    assert "current_model_state" not in merged and "averaging_state" not in merged
    chosen = read_run_record(merged)["merge"]["chosen"]
    base = {ENCODER_PREFIX + k: v for k, v in SentenceEncoder.from_pretrained(tiny_model_dir).state_dict().items()}
    expected = interpolate(base, last["state_dict"], chosen)  # from the averaged weights, not the raw ones
    assert all(torch.equal(merged["state_dict"][key], value) for key, value in expected.items())
