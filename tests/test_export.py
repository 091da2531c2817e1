"""Export: sentence-transformers and transformers load the folder and give our embeddings; `minilm_sts.load`
takes checkpoints and folders alike. (The model card is tested in test_card.py.)"""

import json

import pytest
import torch

import minilm_sts
from minilm_sts.card import render_model_card
from minilm_sts.export import export_model
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


def test_checkpoint_loads_and_encodes_like_the_trained_model(trained_checkpoint):
    model, path, _ = trained_checkpoint
    loaded = minilm_sts.load(path)
    sentences = ["a man is playing the guitar", "a dog runs", "children eat food"]
    assert torch.allclose(loaded.encode(sentences, batch_size=2), model.encode(sentences), atol=1e-6)
    similarity = loaded.similarity(loaded.encode(sentences[:2]), loaded.encode(sentences))
    assert similarity.shape == (2, 3) and similarity[0, 0] == pytest.approx(1.0, abs=1e-5)
