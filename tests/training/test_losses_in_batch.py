"""In-batch losses with hard negatives, false-negative masking (known duplicates, GIST's guide) and GradCache:
parity with sentence-transformers on the real weights, and their own properties.

Parity runs through the training module's own step (`_step_loss`: column split, guide, mini-batches) on a batch of
n-tuples packed column-major as the loader makes them, in fp32 and eval mode, with the tolerances of
test_losses.py.
"""

import pytest
import torch
from test_losses import assert_matches_reference, reference_loss_and_grads

from minilm_sts.errors import UserInputError
from minilm_sts.training.losses import build_loss, gist_loss, mnrl_loss
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

ROWS, NEGATIVES = 16, 2


@pytest.fixture(scope="module")
def columns() -> list[list[str]]:
    """16 positive pairs of STS-B train (label >= 0.8) whose anchor begins "A man is", and 2 negatives per row
    from the sentences of its pairs labelled <= 0.2 that begin the same way: hard enough to keep every loss far
    from 0. No sentence appears twice."""
    from minilm_sts.data.pairs import read_pairs

    table = read_pairs("builtin:stsb/train")
    close = [i for i, label in enumerate(table.labels) if label >= 0.8 and table.sentences_a[i].startswith("A man is")]
    anchors, positives = [table.sentences_a[i] for i in close[:ROWS]], [table.sentences_b[i] for i in close[:ROWS]]
    far = [s for i, label in enumerate(table.labels) if label <= 0.2 and table.sentences_a[i].startswith("A man is")
           for s in (table.sentences_a[i], table.sentences_b[i])]
    negatives = [s for s in dict.fromkeys(far) if s not in anchors + positives][: ROWS * NEGATIVES]
    assert len(set(anchors + positives + negatives)) == ROWS * (2 + NEGATIVES)
    return [anchors, positives, *(negatives[k * ROWS : (k + 1) * ROWS] for k in range(NEGATIVES))]


@pytest.fixture(scope="module")
def training(real_model_dir) -> SentenceEncoderTraining:
    return SentenceEncoderTraining(pretrained=str(real_model_dir)).eval()


def batch_of(module: SentenceEncoderTraining, columns: list[list[str]], clusters=None) -> dict:
    """A training batch as the loader makes it: every column's sentences packed end to end, column after column."""
    tokens = module.sentence_encoder.tokenize([sentence for column in columns for sentence in column])
    return {**tokens, "labels": torch.ones(len(columns[0])), "columns": len(columns), "clusters": clusters}


def our_loss_and_grads(module, loss, batch, metrics=None):
    module.zero_grad()
    value = module._step_loss(loss, batch, {} if metrics is None else metrics)
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in module.sentence_encoder.bert.named_parameters()
                          if p.grad is not None}


@pytest.mark.parity
def test_mnrl_with_hard_negatives_matches_reference(reference, training, columns):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    expected_loss, expected = reference_loss_and_grads(reference, MultipleNegativesRankingLoss(reference), columns,
                                                       torch.ones(ROWS))
    loss, grads = our_loss_and_grads(training, build_loss("mnrl"), batch_of(training, columns))
    assert_matches_reference(loss, grads, expected_loss, expected, training.sentence_encoder)
    # The negatives count: without them the loss is lower (fewer candidates to beat).
    assert loss > training._step_loss(build_loss("mnrl"), batch_of(training, columns[:2]), {}).item()


def test_mnrl_with_negatives_is_cross_entropy_over_positives_and_negatives():
    """Orthogonal rows: anchor i scores 1 against its positive, 1 against its own negative, 0 elsewhere."""
    u = torch.eye(6)[:3]
    v, negatives = u.clone(), u.clone()
    expected = -torch.log_softmax(torch.tensor([20.0, 0, 0, 20.0, 0, 0]), dim=0)[0]
    assert torch.allclose(mnrl_loss(u, v, torch.ones(3), negatives=negatives), expected)
    assert torch.allclose(mnrl_loss(u, v, torch.ones(3), negatives=negatives, symmetric=True),
                          (expected - torch.log_softmax(torch.tensor([20.0, 0, 0]), dim=0)[0]) / 2)


def test_step_inputs_are_not_user_parameters():
    assert build_loss("mnrl").inputs == {"negatives", "clusters", "metrics"}
    assert build_loss("gist").inputs == {"negatives", "clusters", "guide", "metrics"}
    assert build_loss("cosent").inputs == frozenset()
    for name in ("negatives", "clusters", "guide", "metrics"):
        with pytest.raises(UserInputError, match=f"has no parameter '{name}'"):
            build_loss("gist", {name: None})


@pytest.mark.parametrize("params, expected", [({"margin_strategy": "none"}, "one of 'absolute', 'relative'"),
                                              ({"margin": -0.1}, r"a number >= 0 \(default 0.0\)"),
                                              ({"temperature": 0}, "a positive number"),
                                              ({"mini_batch_size": 2.5}, r"a whole number >= 0 \(default 0\)"),
                                              ({"mini_batch_size": -1}, "a whole number >= 0"),
                                              ({"mask_known_duplicates": 1}, "true or false")])
def test_bad_in_batch_parameters_are_refused(params, expected):
    with pytest.raises(UserInputError, match=f"loss 'gist' parameter '{next(iter(params))}' must be {expected}"):
        build_loss("gist", params)


def test_gist_and_the_cached_options_are_accepted():
    loss = build_loss("gist", {"margin_strategy": "relative", "margin": 0.05, "mini_batch_size": 8})
    assert loss.keywords == {"margin_strategy": "relative", "margin": 0.05} and loss.mini_batch_size == 8
    assert build_loss("mnrl", {"mini_batch_size": 0}).mini_batch_size == 0
    assert gist_loss is loss.func
