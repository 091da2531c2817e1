"""The training losses: parity with sentence-transformers' loss classes, the registry, and their properties.

Parity tolerance, on the real weights in fp32 and eval mode: the loss within 1e-5 relative; each parameter's
gradient within max|ours - theirs| <= 1e-5 * max|theirs| + 1e-7 * G, G the largest gradient entry of the whole
model: fp32 rounding that a tensor with small gradients shares with the big ones (measured worst case: 1.01e-5 *
max|theirs| alone, met by 0.2e-7 * G). The attention key biases are checked apart, see below.
"""

import re

import pytest
import torch

from minilm_sts.data.pair_datasets import PairDataset
from minilm_sts.data.pairs import read_pairs
from minilm_sts.data.token_cache import TokenizedPairs
from minilm_sts.errors import UserInputError
from minilm_sts.model.tokenization import tokenize_texts
from minilm_sts.training.losses import LOSSES, angle_loss, build_loss, cosent_loss, cosine_mse_loss, mnrl_loss

BATCH = 16


def reference_loss(name: str, model):
    """sentence-transformers' loss class for each registered loss, with its own defaults."""
    from sentence_transformers.sentence_transformer import losses

    return {
        "cosine_mse": lambda: losses.CosineSimilarityLoss(model),
        "cosent": lambda: losses.CoSENTLoss(model),
        "angle": lambda: losses.AnglELoss(model),
        "mnrl": lambda: losses.MultipleNegativesRankingLoss(model),
        # What MultipleNegativesSymmetricRankingLoss is in 6.x (that class is deprecated in favour of this).
        "mnrl-symmetric": lambda: losses.MultipleNegativesRankingLoss(
            model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    }[name]()


OUR_LOSSES = {"cosine_mse": build_loss("cosine_mse"), "cosent": build_loss("cosent"), "angle": build_loss("angle"),
              "mnrl": build_loss("mnrl"), "mnrl-symmetric": build_loss("mnrl", {"symmetric": True})}


@pytest.fixture(scope="module")
def stsb_train():
    return read_pairs("builtin:stsb/train")


def fixed_batch(table, positives_only: bool) -> tuple[list[str], list[str], torch.Tensor]:
    """The first 16 pairs of STS-B train; for in-batch negatives, the first 16 positive pairs (label >= 0.8) whose
    sentence A begins "A man is": negatives that close keep the loss far from 0, where fp32 can measure it. No
    sentence appears twice, so no row is its own negative."""
    rows = [i for i, label in enumerate(table.labels)
            if not positives_only or (label >= 0.8 and table.sentences_a[i].startswith("A man is"))][:BATCH]
    a, b = [table.sentences_a[i] for i in rows], [table.sentences_b[i] for i in rows]
    assert len(set(a)) == len(set(b)) == BATCH
    return a, b, torch.tensor([table.labels[i] for i in rows])


def reference_loss_and_grads(model, loss, columns, labels):
    """The reference loss of the sentence columns (anchors, positives, any negatives) and its gradients."""
    model.zero_grad()
    value = loss([model.tokenize(column) for column in columns], labels)
    value.backward()
    return value.item(), {re.sub(r"^0\.(auto_)?model\.", "", n): p.grad.clone()
                          for n, p in model.named_parameters() if p.grad is not None}


def our_loss_and_grads(model, loss, a, b, labels):
    """Through the training path: the pairs tokenized, collated into one packed batch, one encoder call."""
    model.zero_grad()
    ids, offsets, _ = tokenize_texts(model.tokenizer, [s for pair in zip(a, b) for s in pair], 128)
    batch = PairDataset(TokenizedPairs(ids, offsets, labels.numpy())).collate(list(range(len(a))))
    u, v = model(batch["input_ids"], batch["lengths"]).chunk(2)
    value = loss(u, v, batch["labels"])
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.bert.named_parameters() if p.grad is not None}


@pytest.mark.parity
@pytest.mark.parametrize("name", sorted(OUR_LOSSES))
def test_loss_and_gradients_match_reference(name, reference, ours, stsb_train):
    a, b, labels = fixed_batch(stsb_train, positives_only=name.startswith("mnrl"))
    expected_loss, expected = reference_loss_and_grads(reference, reference_loss(name, reference), [a, b], labels)
    loss, grads = our_loss_and_grads(ours, OUR_LOSSES[name], a, b, labels)
    assert_matches_reference(loss, grads, expected_loss, expected, ours)


def assert_matches_reference(loss: float, grads: dict, expected_loss: float, expected: dict, ours) -> None:
    """The loss and every trained parameter's gradient within the tolerances of the module docstring."""
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    trained = [n for n, _ in ours.bert.named_parameters() if not n.startswith("pooler.")]  # BERT's pooler is unused
    assert sorted(grads) == sorted(expected) == sorted(trained)
    largest = max(g.abs().max() for g in expected.values())
    for param, grad in grads.items():
        # The key biases' true gradient is zero (softmax ignores a constant shift), so on both sides they hold only
        # rounding noise: for them, check that the noise is negligible against the largest gradient instead.
        if param.endswith("attention.self.key.bias"):
            assert max(grad.abs().max(), expected[param].abs().max()) <= 1e-6 * largest, param
        else:
            tolerance = 1e-5 * expected[param].abs().max() + 1e-7 * largest
            assert (grad - expected[param]).abs().max() <= tolerance, param


# ----- the registry ----------------------------------------------------------------------------------------------


def test_build_loss_binds_parameters():
    u, v, labels = torch.randn(8, 6), torch.randn(8, 6), torch.rand(8) + 0.1
    assert build_loss("cosent", {"scale": 5})(u, v, labels) == cosent_loss(u, v, labels, scale=5.0)
    assert build_loss("cosent")(u, v, labels) == cosent_loss(u, v, labels, scale=20.0)
    assert build_loss("cosent", {"scale": 5})(u, v, labels) != build_loss("cosent")(u, v, labels)
    assert build_loss("mnrl", {"symmetric": True, "scale": 10.0})(u, v, labels) == mnrl_loss(
        u, v, labels, scale=10.0, symmetric=True)


def test_unknown_loss_names_the_choices():
    with pytest.raises(UserInputError,
                       match="unknown loss 'cosine'; choose one of: cosine_mse, cosent, angle, mnrl, gist"):
        build_loss("cosine")


@pytest.mark.parametrize("name, params, valid", [("cosent", {"temperature": 0.05}, "scale"),
                                                 ("mnrl", {"symetric": True},
                                                  "scale, symmetric, mask_known_duplicates, gather_across_devices, "
                                                  "mini_batch_size"),
                                                 ("cosine_mse", {"scale": 20.0}, "none")])
def test_unknown_parameter_names_the_parameters(name, params, valid):
    with pytest.raises(UserInputError, match=f"loss '{name}' has no parameter '{next(iter(params))}'; "
                                             f"its parameters: {valid}$"):
        build_loss(name, params)


@pytest.mark.parametrize("params, expected", [({"scale": 0}, "a positive number"),
                                              ({"scale": -1.0}, "a positive number"),
                                              ({"scale": float("nan")}, "a positive number"),
                                              ({"scale": "20"}, "a positive number"),
                                              ({"scale": True}, "a positive number"),
                                              ({"symmetric": "yes"}, "true or false"),
                                              ({"symmetric": 1}, "true or false")])
def test_bad_parameter_values_are_refused(params, expected):
    with pytest.raises(UserInputError, match=f"loss 'mnrl' parameter '{next(iter(params))}' must be {expected}"):
        build_loss("mnrl", params)


def test_only_the_in_batch_losses_need_positive_pairs():
    assert [name for name, spec in LOSSES.items() if spec.in_batch_negatives] == ["mnrl", "gist"]


# ----- properties of the losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [cosine_mse_loss, cosent_loss, angle_loss, mnrl_loss])
def test_fp32_under_autocast(loss):
    """bf16 embeddings under bf16 autocast give the fp32 loss of the same (rounded) embeddings."""
    torch.manual_seed(0)
    u, v, labels = torch.randn(32, 384).bfloat16(), torch.randn(32, 384).bfloat16(), torch.rand(32) + 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(u, v, labels)
    assert under_autocast.dtype == torch.float32
    assert under_autocast == loss(u.float(), v.float(), labels)


def test_integer_labels_equal_float_labels():
    u, v = torch.randn(6, 8), torch.randn(6, 8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    for loss in (cosine_mse_loss, cosent_loss, angle_loss):
        assert loss(u, v, labels) == loss(u, v, labels.float())


@pytest.mark.parametrize("loss", [cosent_loss, angle_loss])
def test_ranking_losses_see_only_label_order_and_direction(loss):
    """Only the order of the labels matters, not their spacing, the row order or the embeddings' lengths."""
    torch.manual_seed(0)
    u, v, labels = torch.randn(12, 10), torch.randn(12, 10), torch.rand(12)
    value = loss(u, v, labels)
    order = torch.randperm(12)
    assert torch.allclose(loss(u, v, 3 * labels ** 2 + 1), value)
    assert torch.allclose(loss(u[order], v[order], labels[order]), value)
    assert torch.allclose(loss(4 * u, 0.5 * v, labels), value)
    assert not torch.allclose(loss(u, v, labels.flip(0)), value)


@pytest.mark.parametrize("loss", [cosent_loss, angle_loss])
def test_ranking_losses_are_zero_with_equal_labels(loss):
    u, v = torch.randn(5, 4), torch.randn(5, 4)
    assert loss(u, v, torch.full((5,), 0.7)) == 0


def test_cosent_penalises_each_misordered_pair():
    """Two rows, the lower-labelled one scoring higher by d in cosine: log(1 + exp(scale * d))."""
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cosines 1.0 and 0.6
    loss = cosent_loss(u, v, torch.tensor([0.2, 0.9]), scale=5.0)
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(5.0 * 0.4))).item(), rel=1e-6)
    assert cosent_loss(u, v, torch.tensor([0.9, 0.2]), scale=5.0).item() == pytest.approx(
        torch.log1p(torch.exp(torch.tensor(-5.0 * 0.4))).item(), rel=1e-6)


def test_mnrl_symmetric_is_the_mean_of_both_directions():
    torch.manual_seed(0)
    u, v, labels = torch.randn(8, 16), torch.randn(8, 16), torch.ones(8)
    forward, backward = mnrl_loss(u, v, labels), mnrl_loss(v, u, labels)
    assert forward != backward
    assert torch.allclose(mnrl_loss(u, v, labels, symmetric=True), (forward + backward) / 2)


def test_mnrl_is_cross_entropy_of_picking_the_own_pair():
    """With orthogonal rows and v = u, each A's own B has cosine 1 and every other 0."""
    u = torch.eye(4)
    expected = -torch.log_softmax(torch.tensor([20.0, 0.0, 0.0, 0.0]), dim=0)[0]
    assert torch.allclose(mnrl_loss(u, u, torch.ones(4)), expected)


def test_mnrl_refuses_negative_rows():
    u, v = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"positive pairs only, but the batch rows \[1, 3\] have labels <= 0"):
        mnrl_loss(u, v, torch.tensor([1.0, 0.0, 0.5, 0.0]))
