"""Export: sentence-transformers and transformers load the folder and give our embeddings; the model card
states the run's own numbers; `minilm_sts.load` takes checkpoints and folders alike."""

import json
import re

import lightning as L
import pytest
import torch

import minilm_sts
from minilm_sts.card import render_model_card
from minilm_sts.datamodule import PairDataModule
from minilm_sts.export import export_model, export_with_card
from minilm_sts.module import SentenceEmbedder
from minilm_sts.pairs import read_pairs

SENTENCES = read_pairs("builtin:stsb/dev").sentences_a[:64]


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    return SentenceEmbedder(pretrained=str(real_model_dir)).eval()


@pytest.fixture(scope="module")
def exported(real_model, tmp_path_factory):
    return export_model(real_model, tmp_path_factory.mktemp("export") / "model", render_model_card(real_model))


def test_layout(exported):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
                 "sentence_bert_config.json", "1_Pooling/config.json", "config_sentence_transformers.json", "README.md"):
        assert (exported / name).is_file(), name
    assert (exported / "2_Normalize").is_dir()
    assert json.loads((exported / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert json.loads((exported / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"


@pytest.mark.parity
def test_sentence_transformers_loads_the_export_with_equal_embeddings(exported, real_model):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(exported), device="cpu")
    assert reference.max_seq_length == 128
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    assert (real_model.encode(SENTENCES) - expected).abs().max() <= 1e-5


def test_transformers_loads_the_export(exported, real_model):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    bert = AutoModel.from_pretrained(exported).eval()
    batch = tokenizer(SENTENCES[:8], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert (real_model.encode(SENTENCES[:8]) - pooled).abs().max() <= 1e-5


@pytest.mark.parity
def test_a_sentence_transformers_folder_loads_into_minilm_sts(real_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(real_model.hparams.pretrained), device="cpu")
    reference.max_seq_length = 128
    reference.save(str(tmp_path / "st"))
    loaded = minilm_sts.load(tmp_path / "st")
    assert loaded.hparams.max_seq_length == 128
    assert (loaded.encode(SENTENCES) - reference.encode(SENTENCES, convert_to_tensor=True)).abs().max() <= 1e-5


def test_export_refuses_a_non_empty_folder(real_model, exported):
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(real_model, exported)


@pytest.fixture
def trained_checkpoint(tiny_model_dir, pair_files, tmp_path):
    L.seed_everything(0)
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)
    trainer = L.Trainer(max_epochs=1, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    return model, tmp_path / "run.ckpt"


def test_checkpoint_loads_and_encodes_like_the_trained_model(trained_checkpoint):
    model, path = trained_checkpoint
    loaded = minilm_sts.load(path)
    sentences = ["a man is playing the guitar", "a dog runs", "children eat food"]
    assert torch.allclose(loaded.encode(sentences, batch_size=2), model.encode(sentences), atol=1e-6)
    similarity = loaded.similarity(loaded.encode(sentences[:2]), loaded.encode(sentences))
    assert similarity.shape == (2, 3) and similarity[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_model_card_states_the_run(trained_checkpoint, pair_files, tmp_path):
    model, path = trained_checkpoint
    card = (export_with_card(path, tmp_path / "out") / "README.md").read_text()
    log = model.run_record["log"]
    assert [row["step"] for row in log] == [2, 4]
    for row in log:  # every validation of the run, with its own numbers
        assert re.search(rf"\| \**{row['epoch']:.4f}\** \| \**{row['step']}\** \| \**{row['training_loss']:.4f}\** "
                         rf"\| \**{row['pearson_cosine']:.4f}\** \| \**{row['spearman_cosine']:.4f}\**", card)
    assert f"**spearman_cosine** | **{log[-1]['spearman_cosine']:.4f}**" in card  # the primary metric in bold
    assert "- Size: 40 pairs" in card and "- **Maximum Sequence Length:** 128 tokens" in card
    assert "- **Output Dimensionality:** 32 dimensions" in card and "Cosine Similarity" in card

    table = read_pairs(str(pair_files["train"]))
    lengths = [len(model.tokenizer(s)["input_ids"]) for s in table.sentences_a]
    assert f"min: {min(lengths)} tokens<br>mean: {sum(lengths) / len(lengths):.2f} tokens<br>max: {max(lengths)} tokens" in card
    assert f"min: {min(table.labels):.2f}<br>mean: {sum(table.labels) / 40:.2f}<br>max: {max(table.labels):.2f}" in card
    assert f"| {table.sentences_a[0]} | {table.sentences_b[0]} | {table.labels[0]:g} |" in card
    assert "`batch_size`: 8" in card.split("#### All Hyperparameters")[0]  # non-default
    assert "- PyTorch: " + torch.__version__ in card and "CosineSimilarityLoss" in card
    assert "| Metric | validation |\n" in card  # no test column: no test was run
