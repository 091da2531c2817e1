"""`python -m minilm_sts predict`: embeddings for sentence files, one cosine per row for pair files."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

import minilm_sts
from minilm_sts.errors import PairDataError
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.predict import predict
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

SENTENCES = ["a man is playing the guitar", "a dog runs on the road", "children eat food", "a cat"]


@pytest.fixture
def model(tiny_model_dir):
    return SentenceEncoder.from_pretrained(tiny_model_dir).eval()


def test_sentence_file_gives_embeddings_npy_and_parquet(model, tmp_path):
    source = tmp_path / "sentences.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    expected = model.encode(SENTENCES)
    embeddings = np.load(predict(model, str(source), tmp_path / "out.npy"))
    assert embeddings.shape == (4, 32) and np.allclose(embeddings, expected.numpy(), atol=1e-6)

    import pyarrow.parquet as pq

    table = pq.read_table(predict(model, str(source), tmp_path / "out.parquet", batch_size=2)).to_pydict()
    assert table["sentence"] == SENTENCES
    assert np.allclose(np.array(table["embedding"]), expected.numpy(), atol=1e-6)


def test_pair_file_gives_a_cosine_per_row(model, pair_files, tmp_path):
    rows = list(csv.DictReader(open(predict(model, str(pair_files["val"]), tmp_path / "scores.csv"))))
    assert len(rows) == 12
    a, b = model.encode([rows[0]["sentence_0"]]), model.encode([rows[0]["sentence_1"]])
    assert float(rows[0]["cosine"]) == pytest.approx((a @ b.T).item(), abs=1e-5)


def test_progress_bar_ends_at_100_percent(model, pair_files, tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class RecordedBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordedBar)
    predict(model, str(pair_files["val"]), tmp_path / "scores.csv", batch_size=5)
    assert [(bar.n, bar.total) for bar in bars] == [(5, 5)]  # one bar over both columns: 24 sentences, 5 batches
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES))
    predict(model, str(tmp_path / "s.txt"), tmp_path / "e.npy", batch_size=3)
    assert (bars[-1].n, bars[-1].total) == (2, 2)


def test_bad_prediction_inputs(model, pair_files, tmp_path):
    with pytest.raises(ValueError, match="name a .csv output"):
        predict(model, str(pair_files["val"]), tmp_path / "x.npy")
    (tmp_path / "blank.txt").write_text("a dog\n\n")
    with pytest.raises(PairDataError, match="line 2, column 'line': expected a non-empty sentence"):
        predict(model, str(tmp_path / "blank.txt"), tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_predict_command_from_a_checkpoint(tiny_model_dir, tmp_path):
    import lightning as L

    trainer = L.Trainer(logger=False)
    trainer.strategy.connect(SentenceEncoderTraining(pretrained=str(tiny_model_dir)))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES))
    result = subprocess.run([sys.executable, "-m", "minilm_sts", "predict", str(tmp_path / "m.ckpt"),
                             str(tmp_path / "s.txt"), "--output", str(tmp_path / "e.npy"), "--batch-size", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "e.npy")),
                          minilm_sts.load(tmp_path / "m.ckpt").encode(SENTENCES), atol=1e-6)
