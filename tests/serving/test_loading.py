"""`minilm_sts.load`: checkpoints (today's and those of earlier versions) and model folders give a SentenceEncoder
with the trained embeddings, offline; damaged or foreign checkpoints are refused clearly."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

import minilm_sts
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.data.pairs import read_pairs
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import FIXTURES

# Written by the code before SentenceEncoder existed (state-dict keys `encoder.*`); make.py there says how.
PREVIOUS_LAYOUT = FIXTURES / "checkpoint_v0"
# Written by the last flat-layout code (31 modules, before the subpackages): a checkpoint, its export, its data.
FLAT_LAYOUT = FIXTURES / "checkpoint_v1"
SENTENCES = read_pairs("builtin:stsb/dev").sentences_a[:64]


def save_checkpoint(model: SentenceEncoderTraining, path: Path) -> Path:
    """A checkpoint of `model` as it is, without training."""
    trainer = L.Trainer(logger=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_loads_and_encodes_like_the_trained_model(trained_checkpoint):
    model, path, _ = trained_checkpoint
    loaded = minilm_sts.load(path)
    sentences = ["a man is playing the guitar", "a dog runs", "children eat food"]
    assert torch.allclose(loaded.encode(sentences, batch_size=2), model.encode(sentences), atol=1e-6)
    similarity = loaded.similarity(loaded.encode(sentences[:2]), loaded.encode(sentences))
    assert similarity.shape == (2, 3) and similarity[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_load_gives_the_inference_object_for_checkpoints_and_folders(trained_checkpoint, tiny_model_dir):
    _, path, _ = trained_checkpoint
    for source in (path, tiny_model_dir):
        loaded = minilm_sts.load(source)
        assert isinstance(loaded, SentenceEncoder) and not isinstance(loaded, L.LightningModule)
        assert not loaded.training


def test_checkpoint_loads_without_the_pretrained_folder(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    model = SentenceEncoderTraining(pretrained=str(model_dir))
    path = save_checkpoint(model, tmp_path / "model.ckpt")
    before = model.encode(["a man is playing the guitar", "a dog"])
    shutil.rmtree(model_dir)  # nothing may be read from (or downloaded for) the original folder now

    assert torch.load(path, weights_only=True)["hyper_parameters"]["encoder_config"]["hidden_size"] == 32
    loaded = SentenceEncoderTraining.load_from_checkpoint(path)
    assert torch.allclose(loaded.encode(["a man is playing the guitar", "a dog"]), before, atol=1e-6)
    assert torch.allclose(minilm_sts.load(path).encode(["a man is playing the guitar", "a dog"]), before, atol=1e-6)


def test_checkpoints_of_the_previous_layout_load_with_the_embeddings_they_gave():
    """The fixture's checkpoint names a pretrained folder that no longer exists, so this also loads offline."""
    expected = json.loads((PREVIOUS_LAYOUT / "expected.json").read_text())
    embeddings = torch.tensor(expected["embeddings"])
    path = PREVIOUS_LAYOUT / "last.ckpt"
    assert "encoder.embeddings.word_embeddings.weight" in torch.load(path, weights_only=True)["state_dict"]
    assert torch.allclose(minilm_sts.load(path).encode(expected["sentences"]), embeddings, atol=1e-6)
    model = SentenceEncoderTraining.load_from_checkpoint(path)
    assert torch.allclose(model.encode(expected["sentences"]), embeddings, atol=1e-6)
    assert "sentence_encoder.bert.embeddings.word_embeddings.weight" in model.state_dict()


def test_a_checkpoint_and_export_of_the_flat_layout_load_with_the_embeddings_they_gave():
    expected = json.loads((FLAT_LAYOUT / "expected.json").read_text())
    embeddings = torch.tensor(expected["embeddings"])
    for source in (FLAT_LAYOUT / "last.ckpt", FLAT_LAYOUT / "export"):
        assert torch.allclose(minilm_sts.load(source).encode(expected["sentences"]), embeddings, atol=1e-6), source
    card = (FLAT_LAYOUT / "export" / "README.md").read_text()
    assert "fine-tuned with minilm_sts" in card and "### Training Hardware" in card


def test_a_checkpoint_of_the_flat_layout_resumes(tmp_path):
    path = FLAT_LAYOUT / "last.ckpt"
    model = SentenceEncoderTraining.load_from_checkpoint(path)
    data = PairDataModule(str(FLAT_LAYOUT / "train.tsv"), str(FLAT_LAYOUT / "dev.tsv"), None, batch_size=8,
                          forgetting_guard=False)
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, data, ckpt_path=path)
    record = next(c for c in trainer.callbacks if type(c).__name__ == "RunRecord").record
    assert trainer.global_step == 4 and [row["step"] for row in record["log"]] == [2, 4]


def test_damaged_or_foreign_checkpoints_are_refused_clearly(tiny_model_dir, tmp_path):
    good = save_checkpoint(SentenceEncoderTraining(pretrained=str(tiny_model_dir)), tmp_path / "good.ckpt")
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.ckpt: not a readable checkpoint"):
        minilm_sts.load(tmp_path / "truncated.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not written by minilm_sts"):
        minilm_sts.load(tmp_path / "foreign.ckpt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        minilm_sts.load(tmp_path / "missing.ckpt")


@pytest.mark.parity
def test_a_sentence_transformers_folder_loads_into_minilm_sts(real_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(real_model_dir), device="cpu")
    reference.max_seq_length = 128
    reference.save(str(tmp_path / "st"))
    loaded = minilm_sts.load(tmp_path / "st")
    assert loaded.max_seq_length == 128
    assert (loaded.encode(SENTENCES) - reference.encode(SENTENCES, convert_to_tensor=True)).abs().max() <= 1e-5
