"""The evaluation unit: pair-score metrics and duplicate retrieval, by hand and against sentence-transformers.

Parity tolerance is 1e-6 absolute on every metric and threshold, both when the two sides score the same
embeddings and end to end (each side embedding with its own model code).
"""

from __future__ import annotations

import math
from importlib.metadata import version

import pytest
import torch
import torch.nn.functional as F

from minilm_sts.evaluation.binary import binary_classification
from minilm_sts.evaluation.pair_scores import PairScores, pair_metrics
from minilm_sts.evaluation.retrieval import DuplicateRetrieval, retrieval_metrics, top_k_search

TOLERANCE = 1e-6
CORRELATION_KEYS = {"pearson_cosine", "spearman_cosine"}
BINARY_KEYS = {"cosine_accuracy", "cosine_accuracy_threshold", "cosine_f1", "cosine_precision", "cosine_recall",
               "cosine_f1_threshold", "cosine_ap", "cosine_mcc"}
# sentence-transformers 6 classifies tied scores together and breaks retrieval ties by corpus id. 5.x, the oracle
# of .ci/lowest, reports accuracy and F1 from cuts inside a group of equal scores, which no threshold attains, and
# leaves retrieval ties to torch.topk: the tie-heavy tests give it the tie-break explicitly, or check by hand.
REFERENCE_HANDLES_TIES = int(version("sentence-transformers").split(".")[0]) >= 6
RETRIEVAL_KEYS = {"cosine_mrr@10", "cosine_ndcg@10", "cosine_map@100", "cosine_recall@1", "cosine_recall@10",
                  "cosine_recall@100", "cosine_accuracy@1", "cosine_accuracy@10"}


# --- pair-score metrics by hand -------------------------------------------------------------------------------


def test_binary_metrics_by_hand_with_a_tie_across_classes():
    # Two pairs tie at 0.8, one duplicate and one not: every threshold keeps them together.
    cosine = torch.tensor([0.9, 0.8, 0.8, 0.1], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    values = binary_classification(cosine, labels)
    assert values["cosine_accuracy"] == 0.75  # t=0.85: one duplicate found, both non-duplicates rejected
    assert values["cosine_accuracy_threshold"] == pytest.approx(0.85)  # the higher of two equally good ones
    assert values["cosine_f1"] == pytest.approx(0.8)  # t=0.45: precision 2/3, recall 1
    assert values["cosine_precision"] == pytest.approx(2 / 3)
    assert values["cosine_recall"] == 1.0
    assert values["cosine_f1_threshold"] == pytest.approx(0.45)
    assert values["cosine_ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert values["cosine_mcc"] == pytest.approx(2 / math.sqrt(12))  # tp 2, fp 1, fn 0, tn 1


def test_a_midpoint_that_rounds_onto_the_lower_score_falls_back_to_the_higher():
    low = torch.tensor(0.5, dtype=torch.float32)
    high = torch.nextafter(low, torch.tensor(1.0))  # no float32 between them: (high + low) / 2 rounds to low
    assert (high + low) / 2 == low
    values = binary_classification(torch.stack([high, low]), torch.tensor([1.0, 0.0]))
    assert values["cosine_accuracy"] == 1.0
    assert values["cosine_accuracy_threshold"] == high.item()  # a threshold of `low` would admit the negative


def test_pair_metrics_adds_binary_metrics_only_to_sets_with_both_labels():
    cosine = torch.tensor([0.9, 0.2, 0.5, 0.7])
    assert set(pair_metrics(cosine, torch.tensor([1.0, 0.0, 0.0, 1.0]))) == CORRELATION_KEYS | BINARY_KEYS
    assert set(pair_metrics(cosine, torch.tensor([0.9, 0.1, 0.4, 0.8]))) == CORRELATION_KEYS  # graded
    assert set(pair_metrics(cosine, torch.tensor([1.0, 1.0, 1.0, 0.5]))) == CORRELATION_KEYS


@pytest.mark.filterwarnings("ignore:The variance")  # Pearson against constant labels is NaN, with a warning
def test_binary_metrics_refuse_a_set_with_one_class():
    with pytest.raises(ValueError, match="both present; found \\[1.0\\]"):
        binary_classification(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 1.0]))
    assert "cosine_ap" not in pair_metrics(torch.tensor([0.9, 0.2, 0.4]), torch.tensor([1.0, 1.0, 1.0]))


@pytest.mark.parametrize("cosine, labels, message", [
    (torch.tensor([0.5, float("nan")]), torch.tensor([1.0, 0.0]), "finite"),
    (torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.0, 1.0]), "one length"),
    (torch.tensor([]), torch.tensor([]), "non-empty"),
])
def test_pair_metrics_refuse_malformed_scores(cosine, labels, message):
    with pytest.raises(ValueError, match=message):
        pair_metrics(cosine, labels)


def test_pair_scores_accumulate_a_whole_set_each_pair_once_in_pair_order():
    """Batches arrive out of order, and pair 2 twice (as a distributed sampler pads a shard): compute gives
    each pair once, in pair order, with the metrics of the whole set; reset empties it for the next pass."""
    scores = PairScores()
    scores.update(torch.tensor([0.4, 0.9]), torch.tensor([0.0, 1.0]), torch.tensor([3, 2]))
    scores.update(torch.tensor([0.8, 0.1, 0.9]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 2]))
    scored = scores.compute()
    assert scored.cosine.tolist() == pytest.approx([0.8, 0.1, 0.9, 0.4]) and scored.labels.tolist() == [1, 0, 1, 0]
    assert scored.metrics == pair_metrics(scored.cosine, scored.labels)
    assert CORRELATION_KEYS | BINARY_KEYS == set(scored.metrics)
    scores.reset()
    scores.update(torch.tensor([0.3, 0.2]), torch.tensor([0.5, 0.25]), torch.tensor([0, 1]))
    assert set(scores.compute().metrics) == CORRELATION_KEYS  # the earlier pass is gone, and so are its 0/1 labels


# --- duplicate retrieval by hand ------------------------------------------------------------------------------


def exact_unit_vectors(n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws from 24 unit vectors in 4-D (the axes and (+-1/2, ...)) whose norms and dot products are exact in
    float32, so scores tie exactly whatever the matrix shape (matmul rounding depends on it otherwise)."""
    axes = torch.cat([torch.eye(4), -torch.eye(4)])
    halves = torch.tensor([[(-1) ** (i >> j & 1) / 2 for j in range(4)] for i in range(16)])
    choices = torch.cat([axes, halves])
    return choices[torch.randint(0, len(choices), (n,), generator=generator)]


def unit_vectors_at(cosines: list[float]) -> torch.Tensor:
    """2-D unit vectors whose cosine with (1, 0) is each given value."""
    c = torch.tensor(cosines, dtype=torch.float32)
    return torch.stack([c, (1 - c**2).clamp(min=0).sqrt()], dim=1)


def test_from_pairs_builds_queries_corpus_and_duplicates_in_either_column():
    a = ["A", "C", "A", "E", "B", "A"]
    b = ["B", "A", "D", "E", "F", "C"]
    labels = [1.0, 1.0, 0.0, 1.0, 0.9, 1.0]
    task = DuplicateRetrieval.from_pairs(a, b, labels, corpus=["Z", "A"], positive_label=0.9)
    assert task.corpus == ["Z", "A", "C", "E", "B", "D", "F"]  # the given corpus first, then the file's, each once
    assert [task.corpus[q] for q in task.queries] == ["A", "C", "B"]  # E-E pairs a sentence with itself
    assert [[task.corpus[d] for d in docs] for docs in task.relevant] == [["C", "B"], ["A"], ["A", "F"]]


def test_from_pairs_needs_a_positive_pair():
    with pytest.raises(ValueError, match="no pair is labelled >= 1.0"):
        DuplicateRetrieval.from_pairs(["a", "b"], ["c", "b"], [0.0, 1.0])


def test_duplicate_ranked_third_gives_reciprocal_rank_one_third():
    # Corpus q, x, y, d, z; the query q sees x (0.9), y (0.8), d (0.7), z (0.1) and not itself.
    task = DuplicateRetrieval.from_pairs(["q", "x", "y"], ["d", "z", "z"], [1.0, 0.0, 0.0])
    assert task.corpus == ["q", "x", "y", "d", "z"] and task.relevant == [[3]]
    values = task.evaluate_embeddings(unit_vectors_at([1.0, 0.9, 0.8, 0.7, 0.1]))
    assert values["cosine_mrr@10"] == pytest.approx(1 / 3)
    assert values["cosine_ndcg@10"] == pytest.approx(1 / math.log2(4))
    assert values["cosine_map@100"] == pytest.approx(1 / 3)
    assert (values["cosine_recall@1"], values["cosine_recall@10"], values["cosine_recall@100"]) == (0.0, 1.0, 1.0)
    assert (values["cosine_accuracy@1"], values["cosine_accuracy@10"]) == (0.0, 1.0)


def test_retrieval_metrics_with_several_duplicates():
    # Query 0 finds its two duplicates (5, 7) at ranks 2 and 4; query 1 finds its one (3) at rank 1.
    ranked = torch.tensor([[1, 5, 2, 7], [3, 0, 1, 2]])
    values = retrieval_metrics(ranked, [[5, 7], [3]])
    assert values["cosine_mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert values["cosine_recall@1"] == pytest.approx((0 + 1) / 2)
    assert values["cosine_accuracy@1"] == pytest.approx(0.5)
    assert values["cosine_map@100"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1) / 2)
    ideal = 1 + 1 / math.log2(3)
    assert values["cosine_ndcg@10"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(5)) / ideal + 1) / 2)


def test_tied_documents_rank_in_corpus_order():
    # "early" and "dup" embed identically; the earlier corpus position ranks first, so the duplicate is 2nd.
    task = DuplicateRetrieval.from_pairs(["q", "early"], ["dup", "other"], [1.0, 0.0])
    assert task.corpus == ["q", "early", "dup", "other"]
    assert task.evaluate_embeddings(unit_vectors_at([1.0, 0.6, 0.6, 0.2]))["cosine_mrr@10"] == 0.5


def test_chunked_search_equals_one_full_stable_sort():
    """Heavily tied scores (5 distinct values), chunks smaller than k, self-exclusion: the result is the
    (score descending, position ascending) order of the full score matrix."""
    corpus = exact_unit_vectors(300, torch.Generator().manual_seed(0))
    queries = torch.arange(0, 300, 7)
    ranked = top_k_search(corpus[queries], corpus, 40, exclude=queries, query_chunk=5, corpus_chunk=33)
    scores = corpus[queries] @ corpus.T
    scores[torch.arange(len(queries)), queries] = float("-inf")
    expected = scores.sort(dim=1, descending=True, stable=True).indices[:, :40]
    assert torch.equal(ranked, expected)
    assert torch.equal(top_k_search(corpus[queries], corpus[:30], 40), (corpus[queries] @ corpus[:30].T)
                       .sort(dim=1, descending=True, stable=True).indices)  # k beyond the corpus: all of it


def test_evaluate_embeds_the_corpus_once_and_checks_the_shape():
    task = DuplicateRetrieval.from_pairs(["a b", "c"], ["b a", "d"], [1.0, 0.0])
    calls = []

    def encode(sentences):
        calls.append(list(sentences))
        return unit_vectors_at([1.0, 0.2, 0.9, 0.1])  # "a b", "c", "b a", "d"

    assert task.evaluate(encode)["cosine_mrr@10"] == 1.0
    assert calls == [task.corpus]
    with pytest.raises(ValueError, match=r"expected embeddings of shape \[4, dim\]"):
        task.evaluate(lambda sentences: torch.zeros(3, 2))


# --- parity with sentence-transformers ------------------------------------------------------------------------


class FixedEmbeddings:
    """Stands in for a SentenceTransformer inside its evaluators, answering every encode from one table, so both
    sides score exactly the same embeddings."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    def encode(self, sentences, convert_to_tensor=False, **kwargs):
        rows = torch.stack([self.table[s] for s in sentences])
        return rows if convert_to_tensor else rows.numpy()

    encode_query = encode_document = encode


@pytest.mark.parity
def test_binary_metrics_match_sentence_transformers_on_tie_heavy_scores():
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator as Reference
    from sklearn.metrics import average_precision_score, matthews_corrcoef

    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(2, 60, (1,), generator=generator))
        scores = torch.rand(n, generator=generator) if trial % 2 else torch.randint(0, 5, (n,), generator=generator) / 4
        labels = torch.randint(0, 2, (n,), generator=generator)
        labels[:2] = torch.tensor([0, 1])
        ours = binary_classification(scores, labels.float())
        assert_best_and_attained(scores, labels, ours)
        if not REFERENCE_HANDLES_TIES:
            continue  # the hand-made oracle above is the whole check
        s, y = scores.numpy(), labels.numpy()
        accuracy, accuracy_threshold = Reference.find_best_acc_and_threshold(s, y, True)
        f1, precision, recall, f1_threshold = Reference.find_best_f1_and_threshold(s, y, True)
        reference = {"cosine_accuracy": accuracy, "cosine_accuracy_threshold": accuracy_threshold,
                     "cosine_f1": f1, "cosine_precision": precision, "cosine_recall": recall,
                     "cosine_f1_threshold": f1_threshold, "cosine_ap": average_precision_score(y, s),
                     "cosine_mcc": matthews_corrcoef(y, s >= f1_threshold)}
        assert ours == pytest.approx({k: float(v) for k, v in reference.items()}, abs=1e-12), f"trial {trial}"


def assert_best_and_attained(scores: torch.Tensor, labels: torch.Tensor, ours: dict[str, float]) -> None:
    """An oracle that needs no reference: every threshold that can be drawn (each distinct score, and one above
    them all) tried by hand. Our accuracy and F1 are the best of those, and our thresholds attain them."""
    def outcome(threshold: float) -> dict[str, float]:
        predicted, actual = scores >= threshold, labels == 1
        hits = int((predicted & actual).sum())
        precision = hits / int(predicted.sum()) if predicted.any() else 0.0
        recall = hits / int(actual.sum())
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        return {"accuracy": float((predicted == actual).double().mean()), "f1": f1, "precision": precision,
                "recall": recall}

    every = [outcome(t) for t in [math.inf, *scores.unique().tolist()]]
    assert ours["cosine_accuracy"] == pytest.approx(max(o["accuracy"] for o in every), abs=1e-12)
    assert ours["cosine_f1"] == pytest.approx(max(o["f1"] for o in every), abs=1e-12)
    assert outcome(ours["cosine_accuracy_threshold"])["accuracy"] == pytest.approx(ours["cosine_accuracy"], abs=1e-12)
    at_f1 = outcome(ours["cosine_f1_threshold"])
    assert [at_f1["f1"], at_f1["precision"], at_f1["recall"]] == pytest.approx(
        [ours["cosine_f1"], ours["cosine_precision"], ours["cosine_recall"]], abs=1e-12)


@pytest.mark.parity
def test_retrieval_matches_sentence_transformers_on_tie_heavy_embeddings():
    """Few distinct embeddings, so most scores tie: ST 6 breaks ties by corpus id, which here sorts as position."""
    generator = torch.Generator().manual_seed(1)
    texts = [f"s{i}" for i in range(150)]
    a = [texts[int(i)] for i in torch.randint(0, 150, (120,), generator=generator)]
    b = [texts[int(i)] for i in torch.randint(0, 150, (120,), generator=generator)]
    labels = torch.randint(0, 2, (120,), generator=generator).tolist()
    task = DuplicateRetrieval.from_pairs(a, b, labels)
    embeddings = exact_unit_vectors(len(task.corpus), generator)
    stand_in = FixedEmbeddings(dict(zip(task.corpus, embeddings)))
    reference = flatten(reference_retrieval(task).compute_all_metrics(stand_in))
    assert task.evaluate_embeddings(embeddings) == pytest.approx(pick(reference, RETRIEVAL_KEYS), abs=1e-12)


def reference_retrieval(task: DuplicateRetrieval):
    """sentence-transformers' InformationRetrievalEvaluator on the same queries, corpus and duplicates. Corpus ids
    are zero-padded positions so its id tie-break is our position tie-break. It has no notion of a query being
    in the corpus, so its score function gives each query's own corpus entry the lowest score, as ours does."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    queries = {f"q{i}": task.corpus[q] for i, q in enumerate(task.queries)}
    relevant = {f"q{i}": {f"{d:08d}" for d in docs} for i, docs in enumerate(task.relevant)}
    own = torch.tensor(task.queries)

    def cosine_without_self(query_embeddings, corpus_embeddings):
        assert corpus_embeddings.shape[0] == len(task.corpus)  # one corpus chunk, so positions are global
        scores = cos_sim(query_embeddings, corpus_embeddings)
        if not REFERENCE_HANDLES_TIES:  # lower each position by a hair, far below any gap between distinct scores
            scores = scores.double() - 1e-9 * torch.arange(len(task.corpus), dtype=torch.float64)
        scores[torch.arange(len(own)), own] = float("-inf")
        return scores

    return InformationRetrievalEvaluator(
        queries, {f"{i:08d}": text for i, text in enumerate(task.corpus)}, relevant, mrr_at_k=[10], ndcg_at_k=[10],
        map_at_k=[100], precision_recall_at_k=[1, 10, 100], accuracy_at_k=[1, 10], write_csv=False,
        score_functions={"cosine": cosine_without_self}, corpus_chunk_size=len(task.corpus))


def flatten(nested: dict) -> dict[str, float]:
    """compute_all_metrics' {"cosine": {"mrr@k": {10: v}}} as the flat names its __call__ returns."""
    return {f"{name}_{metric.replace('@k', f'@{k}')}": float(value)
            for name, metrics in nested.items() for metric, by_k in metrics.items() for k, value in by_k.items()}


def pick(values: dict, keys: set[str]) -> dict[str, float]:
    return {key: float(values[key]) for key in keys}


# --- parity on the real weights and packaged STS-B ------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """sentence-transformers' model and ours on the same all-MiniLM-L6-v2 weights, both truncating at 128."""
    from sentence_transformers import SentenceTransformer

    from minilm_sts.model.pretrained import DEFAULT_MODEL, resolve_pretrained
    from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

    folder = str(resolve_pretrained(DEFAULT_MODEL))
    reference = SentenceTransformer(folder, device="cpu")
    reference.max_seq_length = 128
    return reference, SentenceEncoderTraining(pretrained=folder, max_seq_length=128).eval()


@pytest.fixture(scope="module")
def stsb_dev():
    from minilm_sts.data.pairs import read_pairs

    return read_pairs("builtin:stsb/dev")


@pytest.mark.parity
@pytest.mark.slow
def test_binary_classification_matches_sentence_transformers_on_real_weights(models, stsb_dev):
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator

    reference_model, ours = models
    a, b = stsb_dev.sentences_a, stsb_dev.sentences_b
    labels = [int(label >= 0.6) for label in stsb_dev.labels]
    evaluator = BinaryClassificationEvaluator(a, b, labels, write_csv=False, similarity_fn_names=["cosine"])
    reference_values = evaluator.compute_metrics(reference_model)["cosine"]
    expected = {f"cosine_{key}": float(value) for key, value in reference_values.items()}
    assert set(expected) == BINARY_KEYS

    # Both sides score ST's own embeddings; our cosine is the one validation uses.
    texts = sorted({*a, *b})
    table = dict(zip(texts, reference_model.encode(texts, convert_to_tensor=True)))
    same = {f"cosine_{key}": float(value)
            for key, value in evaluator.compute_metrics(FixedEmbeddings(table))["cosine"].items()}
    cosine = F.cosine_similarity(torch.stack([table[s] for s in a]), torch.stack([table[s] for s in b]), dim=1)
    label_tensor = torch.tensor(labels, dtype=torch.float64)
    assert pick(pair_metrics(cosine.double(), label_tensor), BINARY_KEYS) == pytest.approx(same, abs=TOLERANCE)

    # End to end: our encoder and our metrics against ST's evaluator on its model.
    cosine = F.cosine_similarity(ours.encode(a), ours.encode(b), dim=1).double()
    assert pick(pair_metrics(cosine, label_tensor), BINARY_KEYS) == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parity
@pytest.mark.slow
def test_duplicate_retrieval_matches_sentence_transformers_on_real_weights(models, stsb_dev):
    reference_model, ours = models
    rows = slice(0, 400)
    task = DuplicateRetrieval.from_pairs(stsb_dev.sentences_a[rows], stsb_dev.sentences_b[rows],
                                         stsb_dev.labels[rows], positive_label=0.8)
    assert len(task.queries) > 50 and len(task.corpus) > 100  # more documents than the deepest cutoff
    evaluator = reference_retrieval(task)
    expected = pick(evaluator(reference_model), RETRIEVAL_KEYS)

    embeddings = reference_model.encode(task.corpus, convert_to_tensor=True)
    same = flatten(evaluator.compute_all_metrics(FixedEmbeddings(dict(zip(task.corpus, embeddings)))))
    assert task.evaluate_embeddings(embeddings) == pytest.approx(pick(same, RETRIEVAL_KEYS), abs=TOLERANCE)

    assert task.evaluate(ours.encode) == pytest.approx(expected, abs=TOLERANCE)
