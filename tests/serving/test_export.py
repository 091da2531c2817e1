"""Export: sentence-transformers and transformers load the folder and give our embeddings; a model folder
exports with a base model's card. (The run's model card is tested in test_card.py, loading in test_loading.py.)"""

import json

import pytest
import torch

import minilm_sts
from minilm_sts.data.pairs import read_pairs
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.export import export_model, export_with_card
from minilm_sts.serving.model_card import render_model_card
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

SENTENCES = read_pairs("builtin:stsb/dev").sentences_a[:64]


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    return SentenceEncoderTraining(pretrained=str(real_model_dir)).eval()


@pytest.fixture(scope="module")
def exported(real_model, tmp_path_factory):
    return export_model(real_model.sentence_encoder, tmp_path_factory.mktemp("export") / "model",
                        render_model_card(real_model.hparams))


def test_layout(exported):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
                 "sentence_bert_config.json", "1_Pooling/config.json", "config_sentence_transformers.json",
                 "README.md"):
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


def test_export_refuses_a_non_empty_folder(real_model, exported):
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(real_model.sentence_encoder, exported)


def test_a_model_folder_exports_with_a_base_model_card(tiny_model_dir, tmp_path):
    card = (export_with_card(tiny_model_dir, tmp_path / "out") / "README.md").read_text()
    sentences = ["a man is playing the guitar", "a dog runs"]
    expected = SentenceEncoder.from_pretrained(tiny_model_dir).encode(sentences)
    assert torch.allclose(minilm_sts.load(tmp_path / "out").encode(sentences), expected, atol=1e-6)
    assert f"# {tiny_model_dir}\n" in card and "## Training Details" not in card
