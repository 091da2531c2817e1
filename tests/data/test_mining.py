"""Hard-negative mining (minilm_sts/data/mining.py) with an encoder whose cosines are set by hand: each sentence's
vector is `cosine` times the anchor's direction plus a direction of its own, so its score against the anchor is
exactly what the test says."""

import json
import math
import re
from importlib.metadata import version

import pytest
import torch

import minilm_sts.data.mining as mining
from minilm_sts.data.mining import MiningOptions, mine_negatives, mined_rows, read_positive_pairs, write_mined
from minilm_sts.data.pairs import read_pairs
from minilm_sts.errors import UserInputError

from helpers import write_tsv


class SetCosines:
    """`encode` gives unit vectors: anchors ("A...") on axis 0, every other sentence at its given cosine to them."""

    def __init__(self, cosines: dict[str, float]):
        self.cosines = cosines

    def encode(self, sentences, batch_size=32, show_progress=False):
        vectors = torch.zeros(len(sentences), len(sentences) + 1, dtype=torch.float64)
        for i, text in enumerate(sentences):
            cosine = self.cosines.get(text, 1.0 if text.startswith("A") else 0.0)
            vectors[i, 0], vectors[i, i + 1] = cosine, math.sqrt(1 - cosine**2)
        return vectors.float()


# A's positive P at 0.8; five candidates, most similar first.
COSINES = {"P": 0.8, "N90": 0.9, "N79": 0.79, "N75": 0.75, "N50": 0.5, "N30": 0.3}


@pytest.fixture
def one_anchor(tmp_path):
    """A file with one positive pair (A, P); the candidates come from its negative rows."""
    rows = [["A", "P", 1.0], ["N90", "N79", 0.0], ["N75", "N50", 0.0], ["N30", "N90", 0.2]]
    return read_positive_pairs(str(write_tsv(tmp_path / "pairs.tsv", rows)))


def negatives(pairs, cosines=COSINES, **options):
    return mine_negatives(SetCosines(cosines), pairs, options=MiningOptions(**options)).negatives


def test_the_top_candidates_are_the_most_similar_sentences_but_the_anchor_and_its_positives(one_anchor):
    assert negatives(one_anchor, num_negatives=3) == [["N90", "N79", "N75"]]


@pytest.mark.parametrize("margins, expected", [
    ({"absolute_margin": 0.1}, ["N50", "N30"]),  # kept if score + 0.1 <= 0.8
    ({"absolute_margin": 0.0}, ["N79", "N75", "N50", "N30"]),  # 0: below the positive
    ({"relative_margin": 0.05}, ["N75", "N50", "N30"]),  # kept if score <= 0.8 - 0.8 * 0.05 = 0.76
    ({"relative_margin": 0.05, "absolute_margin": 0.2}, ["N50", "N30"]),  # both hold
])
def test_a_margin_keeps_only_candidates_far_enough_below_the_positive(one_anchor, margins, expected):
    assert negatives(one_anchor, num_negatives=len(expected), range_max=10, **margins) == [expected]


def test_the_relative_margin_lowers_the_bar_for_a_negative_positive_score(one_anchor):
    """P at -0.5: kept only below -0.5 - 0.5 * 0.2 = -0.6 (not -0.5 * 0.8 = -0.4, which would sit above P)."""
    cosines = {"P": -0.5, "N90": -0.55, "N79": -0.65, "N75": -0.7, "N50": -0.9, "N30": -0.95}
    assert negatives(one_anchor, cosines, num_negatives=4, range_max=10, relative_margin=0.2) == [
        ["N79", "N75", "N50", "N30"]]


@pytest.mark.parametrize("range_min, range_max, expected", [
    (0, 2, ["N90", "N79"]), (1, 3, ["N79", "N75"]), (3, 10, ["N50", "N30"])])
def test_the_rank_range_counts_among_candidates_that_are_not_left_out(one_anchor, range_min, range_max, expected):
    assert negatives(one_anchor, num_negatives=2, range_min=range_min, range_max=range_max) == [expected]


def test_range_min_skips_the_best_candidates_that_pass_the_margin(one_anchor):
    """As in sentence-transformers: ranks are counted after the margin, so range_min=1 skips N75, not N90."""
    assert negatives(one_anchor, num_negatives=2, range_min=1, range_max=10, relative_margin=0.05) == [
        ["N50", "N30"]]


def test_an_anchor_short_of_candidates_is_dropped_with_its_reason(one_anchor):
    mined = mine_negatives(SetCosines(COSINES), one_anchor,
                           options=MiningOptions(num_negatives=3, range_max=10, absolute_margin=0.1))
    assert mined.negatives == [None] and mined.kept == 0
    assert mined.dropped == {"the margins left fewer than 3 candidates in the rank range": 1}
    mined = mine_negatives(SetCosines(COSINES), one_anchor, options=MiningOptions(num_negatives=6, range_max=10))
    assert mined.dropped == {"fewer than 6 candidates outside its cluster in the rank range": 1}
    assert mined_rows(mined, "triplets")[1] == mined_rows(mined, "pairs")[1] == []
    assert mined.summary_lines()[1:] == ["negatives: 0 (6 for each of 0 anchors)", "anchors dropped: 1 (1 fewer "
                                         "than 6 candidates outside its cluster in the rank range)"]


def test_the_default_range_max_is_sentence_transformers(one_anchor):
    """range_min + num_negatives (x10 under a margin) + the most positives of any anchor (here 1)."""
    assert mine_negatives(SetCosines(COSINES), one_anchor, options=MiningOptions(num_negatives=2)).rank_range == (0, 3)
    with_margin = MiningOptions(num_negatives=2, range_min=1, absolute_margin=0.0)
    assert mine_negatives(SetCosines(COSINES), one_anchor, options=with_margin).rank_range == (1, 22)


def test_cluster_masking_leaves_out_a_duplicate_of_a_duplicate(tmp_path):
    """A~P and P~C: C is in A's cluster, though not A's own positive. sentence-transformers would take it
    (the closest sentence to A) as A's hardest negative; without cluster masking, so do we."""
    rows = [["A", "P", 1.0], ["P", "C", 1.0], ["N90", "N79", 0.0], ["N75", "N50", 0.0]]
    pairs = read_positive_pairs(str(write_tsv(tmp_path / "pairs.tsv", rows)))
    cosines = {**COSINES, "C": 0.95}
    masked = negatives(pairs, cosines, num_negatives=2)
    assert masked[0] == ["N90", "N79"]
    assert "A" not in masked[1] and "C" not in masked[1]  # P's own negatives: never A (its cluster)
    assert negatives(pairs, cosines, num_negatives=2, cluster_masking=False)[0] == ["C", "N90"]


def test_id_columns_make_texts_of_one_question_one_sentence(tmp_path):
    """P2 shares P's question id, so it is in A's cluster although no positive pair names it."""
    rows = [["A", "P", "1", "2", 1.0], ["P2", "N79", "2", "3", 0.0], ["N75", "N50", "4", "5", 0.0]]
    path = str(write_tsv(tmp_path / "pairs.tsv", rows, header=("sentence_0", "sentence_1", "qid1", "qid2", "label")))
    cosines = {**COSINES, "P2": 0.85}
    assert negatives(read_positive_pairs(path), cosines, num_negatives=2) == [["P2", "N79"]]
    assert negatives(read_positive_pairs(path, id_columns=["qid1", "qid2"]), cosines, num_negatives=2) == [
        ["N79", "N75"]]


def test_id_columns_of_whole_numbers_in_json_lines_are_ids_as_texts_are(tmp_path):
    """JSON gives 2 where a TSV gives "2"; both are P's question id, in one file too."""
    rows = [["A", "P", 1, "2", 1.0], ["P2", "N79", 2, 3, 0.0], ["N75", "N50", 4, 5, 0.0]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(zip(["sentence_0", "sentence_1", "qid1", "qid2", "label"], row))) + "\n"
                            for row in rows))
    pairs = read_positive_pairs(str(path), id_columns=["qid1", "qid2"])
    assert negatives(pairs, {**COSINES, "P2": 0.85}, num_negatives=2) == [["N79", "N75"]]


@pytest.mark.parametrize("bad", [None, "", 2.5, True])
def test_an_id_that_is_no_whole_number_or_text_names_its_line_and_column(tmp_path, bad):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"sentence_0": "A", "sentence_1": "P", "qid1": 1, "qid2": 2, "label": 1}) + "\n"
                    + json.dumps({"sentence_0": "B", "sentence_1": "C", "qid1": 3, "qid2": bad, "label": 0}) + "\n")
    with pytest.raises(UserInputError, match=rf"pairs\.jsonl, line 2, column 'qid2': expected an id \(a whole number "
                                             rf"or a non-empty text\), got {re.escape(repr(bad))} \(1 such row"):
        read_positive_pairs(str(path), id_columns=["qid1", "qid2"])


def test_texts_that_differ_only_in_case_and_spacing_are_one_sentence_of_a_cluster(tmp_path):
    rows = [["A", "The Positive", 1.0], ["the  positive", "N79", 0.0], ["N75", "N50", 0.0]]
    pairs = read_positive_pairs(str(write_tsv(tmp_path / "pairs.tsv", rows)))
    cosines = {**COSINES, "The Positive": 0.8, "the  positive": 0.8}
    assert negatives(pairs, cosines, num_negatives=2) == [["N79", "N75"]]


def test_random_sampling_draws_in_the_range_and_repeats_with_its_seed(tmp_path, monkeypatch):
    rows = [[f"A{i}", f"P{i}", 1.0] for i in range(6)] + [[f"X{i}", f"Y{i}", 0.0] for i in range(20)]
    pairs = read_positive_pairs(str(write_tsv(tmp_path / "pairs.tsv", rows)))
    cosines = {f"X{i}": 0.6 - i / 100 for i in range(20)}  # and the other anchors at 1.0

    def draw(seed):
        return negatives(pairs, cosines, num_negatives=3, range_max=12, sampling_strategy="random", seed=seed)

    first = draw(1)
    top = negatives(pairs, cosines, num_negatives=12)
    assert all(len(set(n)) == 3 and set(n) <= set(ranked) for n, ranked in zip(first, top))
    assert first == draw(1) and first != draw(2)
    assert len({tuple(n) for n in first}) > 1  # each anchor draws on its own
    monkeypatch.setattr(mining, "ANCHOR_BLOCK", 1)  # a draw does not depend on how anchors are blocked
    assert draw(1) == first


def test_blocks_of_any_size_find_the_same_negatives(tmp_path, monkeypatch):
    rows = [[f"A{i}", f"P{i}", 1.0] for i in range(5)] + [[f"X{i}", f"Y{i}", 0.0] for i in range(10)]
    pairs = read_positive_pairs(str(write_tsv(tmp_path / "pairs.tsv", rows)))
    cosines = {f"X{i}": 0.6 - i / 100 for i in range(10)}
    whole = negatives(pairs, cosines, num_negatives=4)
    monkeypatch.setattr(mining, "ANCHOR_BLOCK", 2)
    assert negatives(pairs, cosines, num_negatives=4) == whole
    monkeypatch.setattr(mining, "GATHER_FLOATS", 1)  # scores gathered one anchor at a time
    assert negatives(pairs, cosines, num_negatives=4) == whole
    assert whole[0] == ["A1", "A2", "A3", "A4"] and whole[4] == ["A0", "A1", "A2", "A3"]  # ties: earlier first


def test_an_unlabelled_file_is_all_positive_pairs(tmp_path):
    path = write_tsv(tmp_path / "pairs.tsv", [["A", "P"], ["N90", "N79"]], header=("sentence_0", "sentence_1"))
    pairs = read_positive_pairs(str(path))
    assert pairs.anchors == ["A", "N90"] and pairs.positives == [["P"], ["N79"]]


def test_positives_are_labels_of_1_after_the_label_scale(tmp_path):
    path = str(write_tsv(tmp_path / "pairs.tsv", [["A", "P", 5.0], ["B", "Q", 4.0]]))
    assert read_positive_pairs(path, label_scale=5.0).anchors == ["A"]
    with pytest.raises(UserInputError, match=r"no positive pairs \(label >= 1 after dividing by label_scale=6\)"):
        read_positive_pairs(path, label_scale=6.0)


def test_both_output_formats(one_anchor, tmp_path):
    mined = mine_negatives(SetCosines(COSINES), one_anchor, options=MiningOptions(num_negatives=2))
    assert mined_rows(mined, "triplets") == (["anchor", "positive", "negative_1", "negative_2"],
                                             [("A", "P", "N90", "N79")])
    assert mined_rows(mined, "pairs") == (["sentence_0", "sentence_1", "label"],
                                          [("A", "P", 1.0), ("A", "N90", 0.0), ("A", "N79", 0.0)])
    for suffix in (".tsv", ".csv", ".jsonl", ".parquet"):
        assert write_mined(mined, tmp_path / f"out{suffix}", "pairs") == 3
        table = read_pairs(str(tmp_path / f"out{suffix}"))
        assert (table.sentences_b, table.labels) == (["P", "N90", "N79"], [1.0, 0.0, 0.0])


def test_a_failed_write_leaves_no_file(one_anchor, tmp_path, monkeypatch):
    def broken(path, columns, records):
        path.write_text("half a file")
        raise OSError("disk full")

    monkeypatch.setitem(mining.PAIR_WRITERS, "tsv", broken)
    mined = mine_negatives(SetCosines(COSINES), one_anchor, options=MiningOptions(num_negatives=2))
    with pytest.raises(OSError, match="disk full"):
        write_mined(mined, tmp_path / "out.tsv")
    assert list(tmp_path.iterdir()) == [tmp_path / "pairs.tsv"]


@pytest.mark.parametrize("options, message", [
    ({"num_negatives": 0}, "num_negatives must be at least 1, got 0"),
    ({"range_min": -1}, "range_min must be at least 0"),
    ({"range_min": 2, "range_max": 4}, r"the rank range \[2, 4\) holds fewer than num_negatives=3"),
    ({"relative_margin": -0.1}, "relative_margin must be a number >= 0"),
    ({"absolute_margin": float("nan")}, "absolute_margin must be a number >= 0"),
    ({"sampling_strategy": "best"}, "sampling_strategy must be one of top, random"),
    ({"seed": -1}, "seed must be at least 0, got -1"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(UserInputError, match=message):
        MiningOptions(**options).check()


# ---------------------------------------------------------------------------------------------------------------
# Parity with sentence-transformers' mine_hard_negatives on the real weights

TIE = 1e-6  # scores this close may rank either way: the two libraries' embeddings differ in the last bits


@pytest.fixture(scope="module")
def stsb_positives(tmp_path_factory):
    """STS-B dev with its pairs scored >= 0.8 (4 of 5) as positives, each once and none a sentence paired with itself
    (sentence-transformers counts rows, not distinct positives, when it sizes its window); the other rows keep their
    labels and bring their sentences into the corpus: 261 anchors, 2,909 sentences."""
    table = read_pairs("builtin:stsb/dev")
    rows, seen = [], set()
    for a, b, label in zip(table.sentences_a, table.sentences_b, table.labels):
        if label >= 0.8 and (a == b or (a, b) in seen):
            continue
        seen.add((a, b))
        rows.append([a, b, 1.0 if label >= 0.8 else label])
    return read_positive_pairs(str(write_tsv(tmp_path_factory.mktemp("stsb") / "dev.tsv", rows)))


class Cached:
    """An encoder that embeds a list of sentences once, however many mining runs ask for it."""

    def __init__(self, model):
        self.model, self.done = model, {}

    def encode(self, sentences, **kwargs):
        key = tuple(sentences)
        if key not in self.done:
            self.done[key] = self.model.encode(sentences, **kwargs)
        return self.done[key]


@pytest.fixture(scope="module")
def cached_ours(ours):
    return Cached(ours)


def their_negatives(reference, pairs, options, cache_folder) -> dict[str, list[str]]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    rows = [(a, p) for a, positives in zip(pairs.anchors, pairs.positives) for p in positives]
    dataset = Dataset.from_dict({"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]})
    mined = mine_hard_negatives(dataset, reference, corpus=pairs.sentences, output_format="n-tuple",
                                sampling_strategy="top", verbose=False, cache_folder=str(cache_folder), **options)
    k = options["num_negatives"]
    return {row["anchor"]: [row[f"negative_{i}"] for i in range(1, k + 1)] for row in mined}


def unexplained(anchor_embedding, ours, theirs, embeddings, thresholds) -> list[str]:
    """The candidates chosen by one side only whose score ties neither a candidate chosen by the other side only
    nor a margin's threshold."""
    only_ours, only_theirs = set(ours or ()) - set(theirs or ()), set(theirs or ()) - set(ours or ())

    def score(text):
        return float(anchor_embedding @ embeddings[text])

    def tied(text, others):
        return any(abs(score(text) - score(other)) <= TIE for other in others) or any(
            abs(score(text) - threshold) <= TIE for threshold in thresholds)

    return [x for x in only_ours if not tied(x, only_theirs)] + [x for x in only_theirs if not tied(x, only_ours)]


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("options, dropped", [
    ({"num_negatives": 3}, 0),
    ({"num_negatives": 5, "range_min": 2, "relative_margin": 0.05}, 0),
    ({"num_negatives": 4, "range_min": 1, "range_max": 30, "absolute_margin": 0.1}, 0),
    ({"num_negatives": 3, "absolute_margin": 0.02, "relative_margin": 0.1}, 0),
    ({"num_negatives": 3, "range_max": 6, "absolute_margin": 0.3}, 57),
])
def test_without_cluster_masking_the_negatives_are_sentence_transformers(reference, cached_ours, stsb_positives,
                                                                         tmp_path_factory, options, dropped):
    if int(version("sentence-transformers").split(".")[0]) < 6:
        pytest.skip("sentence-transformers 5.x's mine_hard_negatives does not leave the anchor itself out of its "
                    "candidates (6.x does, and looks one rank deeper for it)")
    pairs = stsb_positives
    mined = mine_negatives(cached_ours, pairs, options=MiningOptions(cluster_masking=False, **options))
    theirs = their_negatives(reference, pairs, options, tmp_path_factory.getbasetemp() / "st-embeddings")
    texts = list(dict.fromkeys([*pairs.sentences, *pairs.anchors]))
    embeddings = dict(zip(texts, cached_ours.encode(texts)))
    differing, unexplained_ones = 0, []
    for anchor, positives, negatives in zip(pairs.anchors, pairs.positives, mined.negatives):
        if set(negatives or ()) == set(theirs.get(anchor, ())):
            continue
        differing += 1
        hardest = min(float(embeddings[anchor] @ embeddings[p]) for p in positives)
        thresholds = [hardest - options.get("absolute_margin", 0),
                      hardest - abs(hardest) * options.get("relative_margin", 0)]
        unexplained_ones += unexplained(embeddings[anchor], negatives, theirs.get(anchor), embeddings, thresholds)
    assert len(pairs.anchors) == 261 and len(pairs.anchors) - dropped == mined.kept == len(theirs)
    assert not unexplained_ones, f"{differing} anchors differ; not by a tie: {unexplained_ones}"
    print(f"{differing} of {len(pairs.anchors)} anchors differ, each by a tie; {mined.kept} kept")
