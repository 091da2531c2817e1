"""Parity with the reference: sentence-transformers on the real all-MiniLM-L6-v2 weights (fp32, CPU, eval mode).

Tolerance: embeddings 1e-5 max abs. The losses' parity is in test_losses.py, the evaluators' in test_evaluation.py,
the correlations' against scipy in test_similarity.py.
"""

import pytest
import torch

from minilm_sts.data.pairs import read_pairs
from minilm_sts.model.bert import PaddedLayout


@pytest.fixture(scope="module")
def stsb_test_sentences():
    table = read_pairs("builtin:stsb/test")
    return table.sentences_a + table.sentences_b


@pytest.mark.parity
def test_token_ids_identical(reference, ours, stsb_test_sentences):
    long_text = "Crème brûlée in 東京 " + "word " * 300
    sentences = stsb_test_sentences + ["MiXeD CaSe Ünïcödé", long_text]
    expected = reference.tokenize(sentences)
    got = ours.tokenize(sentences)  # packed: the same ids without padding
    mask = expected["attention_mask"].bool()
    assert expected["input_ids"].shape[1] == 128 and expected["input_ids"][-1, -1] == ours.tokenizer.sep_token_id
    assert torch.equal(got["lengths"], mask.sum(1)) and torch.equal(got["input_ids"], expected["input_ids"][mask])
    assert (mask.sum(1) == 128).sum() == 1  # only the over-long text reaches the limit


@pytest.mark.parity
@pytest.mark.slow
def test_embeddings_match_on_stsb_test(reference, ours, stsb_test_sentences):
    assert len(stsb_test_sentences) == 2758
    expected = reference.encode(stsb_test_sentences, batch_size=32, convert_to_tensor=True)
    got = ours.encode(stsb_test_sentences, batch_size=32, normalize=True)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.allclose(got.norm(dim=1), torch.ones(len(got)), atol=1e-6)


@pytest.mark.parity
def test_packed_path_equals_padded_path(reference, ours, stsb_test_sentences):
    """Training and encode run packed (no padding tokens); the padded path gives the same embeddings."""
    sentences = stsb_test_sentences[::7]
    padded = reference.tokenize(sentences)
    with torch.no_grad():
        via_padding = ours.bert.sentence_embeddings(padded["input_ids"], PaddedLayout(padded["attention_mask"]))
        packed = ours.tokenize(sentences)
        via_packing = ours(packed["input_ids"], packed["lengths"])
    assert (via_packing - via_padding).abs().max().item() <= 1e-5
