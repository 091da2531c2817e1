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


# ----- false negatives ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def in_fp64(real_model_dir) -> tuple:
    """The reference, its guide and our training module (with its guide) on the real weights in fp64. Both guides
    are the base model with every weight scaled by 1 + 0.3 N(0, 1), the same draw: a guide that ranks otherwise
    than the trained model, as after some training, so that the masks differ from the model's own ranking and the
    loss stays well above 0 (with the guide equal to the model it is 1e-7 to 0.03).

    Why fp64: GIST's temperature of 0.01 multiplies the cosines by 100. The reference computes its cosine as a
    sum of products of unit vectors, we as a matrix product: they differ by up to 7e-8 in fp32, so in fp32 the
    losses differ by 1.1e-5 to 1.8e-5 relative and the gradients by 1.3 to 2.2 times the tolerance, from rounding
    alone (measured). In fp64 rounding is far below the tolerance, and what remains is any difference of meaning."""
    from sentence_transformers import SentenceTransformer

    from minilm_sts.training.guide import Guide

    reference, reference_guide = (SentenceTransformer(str(real_model_dir), device="cpu") for _ in range(2))
    ours = SentenceEncoderTraining(pretrained=str(real_model_dir))
    ours._guide = Guide(str(real_model_dir), 128)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours._guide.encoder.bert.parameters():
            param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    reference_guide[0].auto_model.load_state_dict(ours._guide.encoder.bert.state_dict())
    for model in (reference, reference_guide):
        model.max_seq_length = 128
    return reference.double().eval(), reference_guide.double().eval(), ours.double().eval()


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("params", [{}, {"margin_strategy": "relative", "margin": 0.05},
                                    {"margin": 0.1, "contrast_anchors": False, "temperature": 0.05}])
def test_gist_with_a_hard_negative_matches_reference(in_fp64, columns, params):
    """GISTEmbedLoss takes one negative column."""
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    reference, reference_guide, training = in_fp64
    reference_loss = GISTEmbedLoss(reference, reference_guide, **params)
    expected_loss, expected = reference_loss_and_grads(reference, reference_loss, columns[:3], torch.ones(ROWS))
    metrics = {}
    loss, grads = our_loss_and_grads(training, build_loss("gist", params), batch_of(training, columns[:3]), metrics)
    assert expected_loss > 0.01
    assert_matches_reference(loss, grads, expected_loss, expected, training.sentence_encoder)
    assert metrics["masked"] > 0


def test_gist_without_false_negatives_is_plain_in_batch_contrast():
    """A guide that scores every candidate far below each positive masks nothing: the loss is then the cross
    entropy over positives, other anchors, other positives and negatives, at scale 1 / temperature."""
    torch.manual_seed(0)
    u, v, negatives = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    guide = torch.cat([torch.eye(8)[:4], torch.eye(8)[:4], -torch.eye(8)[:4]])  # each anchor's positive scores 1
    metrics = {}
    loss = gist_loss(u, v, torch.ones(4), negatives=negatives, guide=guide, temperature=0.05, metrics=metrics)
    unit = torch.nn.functional.normalize
    ap, aa, pp, an = (unit(a) @ unit(b).T for a, b in ((u, v), (u, u), (v, v), (u, negatives)))
    own = torch.eye(4, dtype=torch.bool)
    logits = torch.cat([ap, aa.masked_fill(own, -torch.inf), pp.masked_fill(own, -torch.inf), an], dim=1) / 0.05
    # Only the guide's own self-similarities (1, as high as the positive's) are above the threshold: never counted.
    assert metrics["masked"] == 0
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, torch.arange(4)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_known_duplicates_leave_the_softmax(symmetric):
    """Rows 0 and 1 are duplicates (one cluster), and row 2's negative belongs to row 3's cluster: those
    candidates are dropped for the anchors (and with `symmetric`, the positives) of the same cluster, except each
    anchor's own positive; the masked count says how many."""
    torch.manual_seed(0)
    u, v, negatives, labels = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), torch.ones(4)
    clusters = torch.tensor([7, 7, 8, 9, 7, 7, 8, 9, 10, 11, 9, 12])  # anchors, positives, negatives
    metrics = {}
    masked = mnrl_loss(u, v, labels, negatives=negatives, clusters=clusters, mask_known_duplicates=True,
                       symmetric=symmetric, metrics=metrics)
    logits = 20 * torch.nn.functional.normalize(u) @ torch.nn.functional.normalize(torch.cat([v, negatives])).T
    drop = torch.zeros_like(logits, dtype=torch.bool)
    drop[0, 1] = drop[1, 0] = drop[3, 6] = True
    expected = torch.nn.functional.cross_entropy(logits.masked_fill(drop, -torch.inf), torch.arange(4))
    if symmetric:
        backward = logits[:, :4].T.masked_fill(drop[:, :4].T, -torch.inf)
        expected = (expected + torch.nn.functional.cross_entropy(backward, torch.arange(4))) / 2
    assert torch.allclose(masked, expected)
    assert metrics["masked"] == (5 if symmetric else 3)  # B0 against A1 and B1 against A0 too
    # Off by default: clusters change nothing, and nothing is reported.
    metrics = {}
    assert mnrl_loss(u, v, labels, negatives=negatives, clusters=clusters, symmetric=symmetric, metrics=metrics) == \
        mnrl_loss(u, v, labels, negatives=negatives, symmetric=symmetric)
    assert metrics == {}


# ----- in a fit ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_params", [{}, {"mini_batch_size": 3, "margin": 0.05}])
def test_gist_trains_with_a_frozen_guide_and_logs_the_masked_count(tiny_model_dir, pair_files, tmp_path, loss_params):
    """The guide is the base model in eval mode, outside the optimizer and the checkpoint, in the train precision;
    the masked count is logged at logging steps."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from minilm_sts.data.pair_data_module import PairDataModule

    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss="gist", loss_params=loss_params)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    trainer = L.Trainer(max_steps=4, log_every_n_steps=2, logger=CSVLogger(tmp_path), precision="bf16-mixed",
                        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False)
    trainer.fit(model, data)

    guide = model._guide.encoder
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    assert all(torch.equal(p, q) for p, q in zip(guide.parameters(), SentenceEncoderTraining(
        pretrained=str(tiny_model_dir)).sentence_encoder.parameters()))  # the base, untouched by training
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.sentence_encoder.parameters() if p.requires_grad}
    assert all(key.startswith("sentence_encoder.") for key in model.state_dict())
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [row["step"] for row in rows if row.get("train/masked")] == ["1", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("loss, loss_params", [("gist", {"mini_batch_size": 1}),
                                               ("mnrl", {"mini_batch_size": 1, "mask_known_duplicates": True})])
def test_no_read_back_outside_logging_steps(monkeypatch, tiny_model_dir, pair_files, tmp_path, loss, loss_params):
    """As test_host_sync checks for the default loss: the guide, the masks, their count and GradCache's mini-batches
    read nothing back from the device between logging steps."""
    import functools

    import test_host_sync

    monkeypatch.setattr(test_host_sync, "SentenceEncoderTraining", functools.partial(
        SentenceEncoderTraining, loss=loss, loss_params=loss_params))
    counts = test_host_sync.reads_per_iteration(monkeypatch, tiny_model_dir, pair_files, tmp_path,
                                                precision="bf16-mixed")
    logging = {step for step in range(len(counts)) if (step + 1) % test_host_sync.LOG_EVERY == 0}
    assert all(count == 0 for step, count in enumerate(counts) if step and step not in logging), counts


# ----- GradCache ---------------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.slow
def test_cached_mnrl_matches_reference_and_the_uncached_loss(reference, training, columns):
    """CachedMultipleNegativesRankingLoss with the same mini-batch size (ours cuts the column-major batch, the
    reference each column: any cut gives the same loss and gradients without dropout)."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    reference_loss = CachedMultipleNegativesRankingLoss(reference, mini_batch_size=5)
    expected_loss, expected = reference_loss_and_grads(reference, reference_loss, columns, torch.ones(ROWS))
    loss, grads = our_loss_and_grads(training, build_loss("mnrl", {"mini_batch_size": 5}), batch_of(training, columns))
    assert_matches_reference(loss, grads, expected_loss, expected, training.sentence_encoder)
    whole_loss, whole = our_loss_and_grads(training, build_loss("mnrl"), batch_of(training, columns))
    assert abs(loss - whole_loss) <= 1e-6 * whole_loss
    for param, grad in grads.items():
        assert torch.allclose(grad, whole[param], rtol=1e-4, atol=1e-6 * max(g.abs().max() for g in whole.values()))


@pytest.mark.parity
@pytest.mark.slow
def test_cached_gist_matches_reference(in_fp64, columns):
    """CachedGISTEmbedLoss takes any number of negative columns, as ours does."""
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    reference, reference_guide, training = in_fp64
    reference_loss = CachedGISTEmbedLoss(reference, reference_guide, mini_batch_size=6, margin=0.02)
    expected_loss, expected = reference_loss_and_grads(reference, reference_loss, columns, torch.ones(ROWS))
    loss, grads = our_loss_and_grads(training, build_loss("gist", {"mini_batch_size": 6, "margin": 0.02}),
                                     batch_of(training, columns))
    assert_matches_reference(loss, grads, expected_loss, expected, training.sentence_encoder)


@pytest.mark.parametrize("loss", [build_loss("mnrl", {"mini_batch_size": 3, "symmetric": True}),
                                  build_loss("gist", {"mini_batch_size": 4})])
def test_cached_dropout_replays_the_same_masks(tiny_model_dir, loss):
    """In train mode the second pass draws the dropout masks of the first: the cached loss and gradients equal
    those of the same mini-batches embedded with autograd from the same random state (gist's guide, made at the
    first step, leaves that state alone)."""
    from minilm_sts.training.gradient_cache import MiniBatchLayout

    module = SentenceEncoderTraining(pretrained=str(tiny_model_dir)).train()
    columns = [["a man plays", "the dog runs", "a cat eats food", "children play"],
               ["a man is playing", "dogs run", "the cat is eating", "a child plays"],
               ["a woman sings", "the car is on the road", "water", "men eat"]]
    batch = batch_of(module, columns)
    torch.manual_seed(1)
    cached_loss, cached = our_loss_and_grads(module, loss, batch)

    torch.manual_seed(1)
    module.zero_grad()
    layout = MiniBatchLayout(batch["lengths"], loss.mini_batch_size, module.sentence_encoder.batch_layout)
    embeddings = torch.cat([module.sentence_encoder(*piece) for piece in layout.pieces(batch["input_ids"],
                                                                                       batch["lengths"])])
    pieces = list(layout.pieces(batch["input_ids"], batch["lengths"]))
    guide = module._guide_embeddings(batch, pieces) if "guide" in loss.inputs else None
    whole = module._loss_of_embeddings(loss, embeddings, guide, batch, {})
    whole.backward()
    assert cached_loss == pytest.approx(whole.item(), rel=1e-6)
    for name, param in module.sentence_encoder.bert.named_parameters():
        if param.grad is not None:
            assert torch.allclose(cached[name], param.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.slow
def test_a_cached_training_step_equals_an_uncached_one_under_fp16_scaling_and_clipping(tiny_model_dir, pair_files):
    """Lightning's automatic optimization with 16-mixed (the loss scaled before backward; the gradients unscaled and
    clipped, here to a norm of 0.05, before the fused AdamW step): without dropout, cached mnrl leaves the
    gradients that mnrl does, up to fp16 rounding, which the two ways of batching the encoder calls round apart."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from minilm_sts.data.pair_data_module import PairDataModule

    def gradient_after_a_step(loss_params):
        L.seed_everything(0)
        model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss="mnrl", loss_params=loss_params,
                                        max_grad_norm=0.05)
        for module in model.modules():  # dropout off, so both sides compute the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_p"):
                module.dropout_p = 0.0
        data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8,
                              forgetting_guard=False)
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                            enable_progress_bar=False,
                            plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
        trainer.fit(model, data)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    cached, whole = gradient_after_a_step({"mini_batch_size": 3}), gradient_after_a_step({})
    assert whole.norm() == pytest.approx(0.05, rel=1e-3)  # unscaled and clipped
    assert cached.norm() == pytest.approx(whole.norm(), rel=1e-3)
    assert torch.nn.functional.cosine_similarity(cached, whole, dim=0) > 0.9999
