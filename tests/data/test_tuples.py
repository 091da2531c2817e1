"""n-tuple training sets (anchor, positive, negative_1 .. negative_k, as mine-negatives writes them): read with every
row checked, cached with their sentences per row, batched column by column without a sentence twice in a batch,
with each sentence's duplicate cluster, and only for a loss with in-batch negatives."""

import json
import sys
import types
from collections import Counter

import datasets
import lightning as L
import numpy as np
import pytest
import torch

from minilm_sts.data.mining import Mined, mined_rows, write_mined
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.data.pair_datasets import PairDataset, duplicate_clusters
from minilm_sts.data.pairs import read_pairs
from minilm_sts.data.token_cache import cache_root, load_tokenized
from minilm_sts.errors import PairDataError

from helpers import write_tsv

TRIPLE = ("anchor", "positive", "negative_1", "negative_2")
ROWS = [["a man plays", "a man is playing", "a dog", "the cat"],
        ["a woman", "the woman", "a man plays", "dogs"],
        ["the cat", "a cat", "a woman", "men"]]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_parquet(path, header, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({name: [row[c] for row in rows] for c, name in enumerate(header)}), path)
    return path


def write_jsonl(path, header, rows):
    path.write_text("".join(json.dumps(dict(zip(header, row))) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("write", [write_tsv, write_jsonl, write_parquet])
def test_every_format_reads_anchor_positive_and_numbered_negatives_as_positive_rows(tmp_path, write):
    suffix = {write_tsv: "tsv", write_jsonl: "jsonl", write_parquet: "parquet"}[write]
    path = tmp_path / f"t.{suffix}"
    if write is write_tsv:
        write(path, ROWS, header=TRIPLE)
    else:
        write(path, TRIPLE, ROWS)
    table = read_pairs(str(path))
    assert table.columns == TRIPLE and table.width == 4 and table.label_column is None
    assert table.sentence_columns() == [list(column) for column in zip(*ROWS)]
    assert table.labels == [1.0, 1.0, 1.0]


def test_a_single_negative_column_and_a_label_column_are_read(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", [["a", "b", "c", "0.5"]], header=("anchor", "positive", "negative", "label"))
    table = read_pairs(str(path))
    assert table.negatives == [["c"]] and table.labels == [0.5] and table.label_column == "label"
    pairs = write_tsv(tmp_path / "p.tsv", [["a", "b"]], header=("anchor", "positive"))
    assert read_pairs(str(pairs)).labels == [1.0] and read_pairs(str(pairs)).width == 2
    explicit = read_pairs(str(path), sentence_columns=["positive", "anchor", "negative"])
    assert explicit.sentences_a == ["b"] and explicit.negatives == [["c"]]


@pytest.mark.parametrize("rows, header, kwargs, message", [
    ([["a", "b", "c", "  "]], TRIPLE, {}, r"line 2, column 'negative_2': expected a non-empty sentence, got '  '"),
    ([["a", "b", "c", "d"], ["a", "", "c", ""]], TRIPLE, {},
     r"line 3, column 'positive': expected a non-empty sentence, got '' \(1 such row\(s\) in all\)"),
    ([["a", "b", "c", "d"]], ("anchor", "positive", "negative_1", "negative_3"), {},
     r"negative columns must be numbered negative_1 to negative_k with none missing; found \['negative_1', "
     r"'negative_3'\]"),
    ([["a", "b", "c", "d"]], ("anchor", "positive", "negative", "negative_1"), {}, r"both 'negative' and numbered"),
    ([["a", "b", "c"]], ("anchor", "query", "negative_1"), {}, r"sentence columns .*\['anchor', 'positive', "
                                                                r"'negative_1', '...'\] not found"),
    ([["a", "b", "c"]], ("anchor", "positive", "negative_1"), {"label_column": "score"},
     r"label column score not found"),
    ([["a", "b", "c"]], ("x", "y", "z"), {"sentence_columns": ["x"]}, r"sentence_columns must name at least two"),
])
def test_bad_tuple_rows_and_columns_name_the_file_row_and_column(tmp_path, rows, header, kwargs, message):
    path = write_tsv(tmp_path / "bad.tsv", rows, header=header)
    with pytest.raises(PairDataError, match=message) as err:
        read_pairs(str(path), **kwargs)
    assert str(path) in str(err.value) or "sentence_columns" in message


def test_a_bad_parquet_negative_names_its_row(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", TRIPLE, [ROWS[0], ["a", "b", None, "d"]])
    with pytest.raises(PairDataError, match=r"t\.parquet, row 2, column 'negative_1': expected a non-empty sentence"):
        read_pairs(str(path))


def test_drop_invalid_leaves_out_a_row_with_an_empty_negative_and_says_so(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", [ROWS[0], ["a", "b", "c", ""], ROWS[1]], header=TRIPLE)
    with pytest.warns(UserWarning, match=r"dropped 1 invalid row\(s\) of 3 .* line 3, column 'negative_2'"):
        table = read_pairs(str(path), drop_invalid=True)
    assert table.sentences_a == [ROWS[0][0], ROWS[1][0]] and table.negatives[1] == [ROWS[0][3], ROWS[1][3]]


def test_what_mine_negatives_writes_reads_back_as_the_same_rows(tmp_path):
    mined = Mined(["a man plays", "a woman"], [["a man is playing"], ["the woman", "women"]],
                  [["a dog", "the cat"], ["dogs", "a cat"]], Counter(), 2, 10, (0, 4))
    columns, records = mined_rows(mined, "triplets")
    for suffix in ("tsv", "csv", "jsonl", "parquet"):
        write_mined(mined, tmp_path / f"m.{suffix}")
        table = read_pairs(str(tmp_path / f"m.{suffix}"))
        assert list(table.columns) == columns and list(zip(*table.sentence_columns())) == records, suffix


def test_cache_keeps_the_columns_per_row_and_chunks_give_the_same_entry(tokenizer, tmp_path, monkeypatch):
    path = str(write_tsv(tmp_path / "t.tsv", ROWS * 3, header=TRIPLE))
    whole = load_tokenized(path, tokenizer, 128)
    assert whole.columns == 4 and len(whole) == 9 and len(whole.offsets) == 4 * 9 + 1
    for row, texts in enumerate(ROWS * 3):
        for column, text in enumerate(texts):
            expected = tokenizer(text, truncation=True, max_length=128)["input_ids"]
            assert whole.sentence(4 * row + column).tolist() == expected
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "chunked"))
    chunked = load_tokenized(path, tokenizer, 128, chunk_rows=2, num_proc=2)
    assert chunked.columns == 4 and np.array_equal(chunked.ids, whole.ids)
    assert np.array_equal(chunked.offsets, whole.offsets) and np.array_equal(chunked.labels, whole.labels)
    (entry,) = cache_root().iterdir()
    assert json.loads((entry / "meta.json").read_text())["columns"] == 4


def test_a_pair_entry_is_written_as_before_tuples(tokenizer, pair_files, tmp_path, monkeypatch):
    """A pair set's entry has no column count in its meta.json (2 is implied), so entries written before n-tuples
    are still whole, and those written now are the same bytes."""
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    pairs = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    (entry,) = cache_root().iterdir()
    assert json.loads((entry / "meta.json").read_text()) == {"pairs": 40, "at_max_length": 0, "dropped": 0}
    assert pairs.columns == 2 and len(pairs.offsets) == 2 * 40 + 1


def test_a_hub_dataset_of_triplets_is_read(tokenizer, monkeypatch):
    rows = {name: [row[c] for row in ROWS] for c, name in enumerate(TRIPLE)}
    hub = datasets.Dataset(datasets.table.InMemoryTable.from_pydict(rows), fingerprint="revision-1")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: hub))
    pairs = load_tokenized("hf:org/triplets:train", tokenizer, 128)
    assert pairs.columns == 4 and pairs.labels.tolist() == [1.0, 1.0, 1.0]


def test_collate_packs_every_anchor_then_every_positive_then_each_negative_column(tokenizer, tmp_path, pair_files):
    pairs = load_tokenized(str(write_tsv(tmp_path / "t.tsv", ROWS, header=TRIPLE)), tokenizer, 128)
    batch = PairDataset(pairs).collate([2, 0])
    order = [4 * row + column for column in range(4) for row in (2, 0)]
    assert batch["columns"] == 4 and "clusters" not in batch
    assert batch["lengths"].tolist() == [len(pairs.sentence(k)) for k in order]
    assert batch["input_ids"].tolist() == [int(i) for k in order for i in pairs.sentence(k)]
    plain = PairDataset(load_tokenized(str(pair_files["train"]), tokenizer, 128)).collate([1, 0])
    assert plain["columns"] == 2 and "clusters" not in plain


def test_duplicate_clusters_are_the_components_of_the_positive_pairs():
    # Sentences 1~2~3 by positive pairs (two rows), 4~5; 6 only ever a negative; 3 a negative of its own cluster.
    ids = np.array([[1, 2, 6, 4], [3, 2, 4, 6], [4, 5, 3, 1]]) * 1000003
    clusters = duplicate_clusters(ids)
    assert clusters.shape == ids.shape
    by_sentence = {int(i): int(c) for i, c in zip(ids.ravel(), clusters.ravel())}
    assert len(by_sentence) == 6  # one cluster per sentence, wherever it appears
    assert by_sentence[1000003] == by_sentence[2000006] == by_sentence[3000009]
    assert by_sentence[4000012] == by_sentence[5000015] != by_sentence[1000003]
    assert by_sentence[6000018] not in (by_sentence[1000003], by_sentence[4000012])
    assert clusters[2, 2] == clusters[0, 0]  # row 2's negative 3 is in the cluster of row 0's anchor


def tuple_data(train, tokenizer, in_batch_negatives=("t",), losses=None, batch_size=4, val=None):
    data = PairDataModule({"t": str(train)}, val, None, batch_size=batch_size, forgetting_guard=False)
    data.tokenize_with(tokenizer, 128, in_batch_negatives, losses=losses)
    data.trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return data


def test_in_batch_batches_keep_every_sentence_of_a_row_apart_and_carry_clusters(tokenizer, tmp_path, pair_files):
    """Negatives are drawn from a small pool that anchors and positives use too: no sentence twice in a batch,
    negatives included, and equal cluster ids exactly where the positive pairs link two sentences."""
    rng = np.random.default_rng(0)
    pool = [f"{a} {b}" for a in ("a man", "the woman", "dogs", "a cat", "men", "the dog", "women", "cats")
            for b in ("plays", "is playing", "on", "with a dog", "and a cat")]
    rows = [list(rng.choice(pool, size=4, replace=False)) for _ in range(30)]
    data = tuple_data(write_tsv(tmp_path / "t.tsv", rows, header=TRIPLE), tokenizer, val=str(pair_files["val"]))
    data.setup("fit")
    loader = data.train_dataloader()
    parent = {text: text for text in pool}  # the positive pairs' components, by text, as the oracle

    def find(text):
        while parent[text] != text:
            text = parent[text]
        return text

    for anchor, positive, *_ in rows:
        parent[find(anchor)] = find(positive)
    seen, linked = [], 0
    for batch in loader:
        rows_in = [rows[i] for i in data.datasets["train"]["t"].rows[batch["indices"].numpy()]]
        texts = [row[c] for c in range(4) for row in rows_in]  # column by column, as the embeddings
        assert batch["columns"] == 4 and len(set(texts)) == len(texts)
        assert batch["clusters"].dtype == torch.int64 and batch["clusters"].shape == (4 * len(rows_in),)
        clusters = batch["clusters"].tolist()
        for i, j in np.ndindex(len(texts), len(texts)):
            assert (clusters[i] == clusters[j]) == (find(texts[i]) == find(texts[j]))
            linked += i != j and clusters[i] == clusters[j]
        seen += batch["indices"].tolist()
    assert sorted(seen) == list(range(30)) and linked > 0  # known duplicates did meet in a batch


def test_a_tuple_set_needs_a_loss_with_in_batch_negatives_and_is_no_evaluation_set(tokenizer, tmp_path, pair_files):
    path = write_tsv(tmp_path / "t.tsv", ROWS, header=TRIPLE)
    data = tuple_data(path, tokenizer, in_batch_negatives=(), losses={"t": "cosent"})
    message = (rf"{path}: training set 't' holds an anchor, a positive and 2 negative\(s\) per row, .* its loss "
               "'cosent' has none; train it with --model.loss mnrl")
    with pytest.raises(PairDataError, match=message):
        data.setup("fit")
    data = tuple_data(pair_files["train"], tokenizer, val=str(path))
    with pytest.raises(PairDataError, match=rf"{path}: an evaluation set is scored pair by pair"):
        data.setup("fit")


def test_the_card_description_says_n_tuple_with_k_negatives(tokenizer, tmp_path, pair_files):
    data = tuple_data(write_tsv(tmp_path / "t.tsv", ROWS, header=TRIPLE), tokenizer, val=str(pair_files["val"]))
    data.setup("fit")
    (described,) = data.describe("train")
    assert described["format"] == "n-tuple with 2 negative(s): anchor, positive and negative_1, negative_2"
    assert described["columns"] == ["anchor", "positive", "label"]
    assert described["negative_columns"] == ["negative_1", "negative_2"] and list(described["tokens"]) == list(TRIPLE)
    assert described["label"] == {"label": {"min": 1.0, "mean": 1.0, "max": 1.0}}
    assert data.describe("val")[0]["format"] == "pairs"
