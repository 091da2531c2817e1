"""Parity with the reference: sentence-transformers on the real all-MiniLM-L6-v2 weights (fp32, CPU, eval mode).

Tolerances: embeddings 1e-5 max abs; loss and gradients 1e-5 relative; correlations 1e-5 against scipy.
"""

import re

import numpy as np
import pytest
import scipy.stats
import torch

from minilm_sts.datamodule import PairDataset
from minilm_sts.encoder import PaddedLayout
from minilm_sts.module import SentenceEmbedder
from minilm_sts.pairs import read_pairs
from minilm_sts.similarity import correlations, cosine_mse_loss
from minilm_sts.tokenized import TokenizedPairs, tokenize_texts


@pytest.fixture(scope="module")
def reference(real_model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(real_model_dir), device="cpu")
    model.max_seq_length = 128  # the recipe's override of the published 256
    return model.eval()


@pytest.fixture(scope="module")
def ours(real_model_dir):
    return SentenceEmbedder(pretrained=str(real_model_dir)).eval()


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
        via_padding = ours.encoder.sentence_embeddings(padded["input_ids"], PaddedLayout(padded["attention_mask"]))
        packed = ours.tokenize(sentences)
        via_packing = ours(packed["input_ids"], packed["lengths"])
    assert (via_packing - via_padding).abs().max().item() <= 1e-5


@pytest.mark.parity
def test_loss_and_gradients_match_cosine_similarity_loss(reference, ours, stsb_test_sentences):
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    a, b = stsb_test_sentences[:16], stsb_test_sentences[1379:1395]
    labels = torch.linspace(0.0, 1.0, 16)

    reference.zero_grad()
    expected_loss = CosineSimilarityLoss(reference)([reference.tokenize(a), reference.tokenize(b)], labels)
    expected_loss.backward()
    expected_grads = {re.sub(r"^0\.(auto_)?model\.", "", n): p.grad for n, p in reference.named_parameters() if p.grad is not None}

    ours.zero_grad()
    ids, offsets, _ = tokenize_texts(ours.tokenizer, [s for pair in zip(a, b) for s in pair], 128)
    batch = PairDataset(TokenizedPairs(ids, offsets, labels.numpy())).collate(list(range(16)))
    u, v = ours(batch["input_ids"], batch["lengths"]).chunk(2)
    loss = cosine_mse_loss(u, v, batch["labels"])
    loss.backward()
    grads = {n: p.grad for n, p in ours.encoder.named_parameters() if p.grad is not None}

    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * expected_loss.item()
    assert sorted(grads) == sorted(expected_grads)
    flat, expected_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, expected_grads))
    assert (flat - expected_flat).norm() <= 1e-5 * expected_flat.norm()
    # Per tensor too. The key biases' true gradient is zero (softmax ignores a constant shift), so on both sides
    # they hold only rounding noise: for them, check that the noise is negligible instead.
    for name, grad in grads.items():
        if name.endswith("attention.self.key.bias"):
            assert max(grad.norm(), expected_grads[name].norm()) <= 1e-6 * expected_flat.norm(), name
        else:
            assert (grad - expected_grads[name]).norm() <= 1e-5 * expected_grads[name].norm(), name


@pytest.mark.parametrize("kind", ["continuous", "binary-ties", "ties-in-scores"])
def test_correlations_match_scipy(kind):
    rng = np.random.default_rng(0)
    labels = rng.random(1000) if kind == "continuous" else rng.integers(0, 2, 1000).astype(float)
    scores = 0.5 * labels + rng.normal(0, 0.3, 1000)
    if kind == "ties-in-scores":
        scores = np.round(scores, 1)
    got = correlations(torch.tensor(scores), torch.tensor(labels))
    assert got["pearson_cosine"] == pytest.approx(scipy.stats.pearsonr(labels, scores)[0], abs=1e-5)
    assert got["spearman_cosine"] == pytest.approx(scipy.stats.spearmanr(labels, scores)[0], abs=1e-5)
