"""The token cache: a second load skips reading and tokenizing; any change of input or options misses;
a damaged entry is rebuilt, never used."""

import sys
import types
import warnings

import datasets
import numpy as np
import pytest
import torch

import minilm_sts.data.token_cache as token_cache
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.data.pair_datasets import PairDataset
from minilm_sts.data.pairs import ReadOptions
from minilm_sts.data.token_cache import cache_root, load_tokenized
from minilm_sts.errors import PairDataError

from helpers import write_tsv


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_second_load_comes_from_cache(tokenizer, pair_files, monkeypatch):
    first = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    monkeypatch.setattr(token_cache, "iter_pair_chunks", lambda *a, **k: pytest.fail("the cached entry was not used"))
    second = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.labels, second.labels)
    assert len(second) == 40


def test_changed_content_or_options_miss_the_cache(tokenizer, pair_files):
    path = str(pair_files["train"])
    base = load_tokenized(path, tokenizer, 128)
    assert load_tokenized(path, tokenizer, 4).ids.size < base.ids.size
    assert (load_tokenized(path, tokenizer, 128, ReadOptions(label_scale=2.0)).labels[0]
            == pytest.approx(base.labels[0] / 2))
    with open(path, "a") as handle:
        handle.write("a dog\ta cat\t0.5\n")
    assert len(load_tokenized(path, tokenizer, 128)) == 41


def test_damaged_entry_is_rebuilt(tokenizer, pair_files, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    path = str(pair_files["train"])
    good = np.array(load_tokenized(path, tokenizer, 128).ids)  # a copy: the entry's arrays are memory-mapped
    (entry,) = cache_root().iterdir()
    (entry / "ids.npy").write_bytes(b"truncated")
    rebuilt = load_tokenized(path, tokenizer, 128)
    assert np.array_equal(rebuilt.ids, good)


def test_collate_packs_column_a_then_column_b(tokenizer, pair_files):
    pairs = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    batch = PairDataset(pairs).collate([3, 0, 7])
    order = (6, 0, 14, 7, 1, 15)  # sentence A of pairs 3, 0, 7, then their sentence B
    assert batch["lengths"].tolist() == [len(pairs.sentence(k)) for k in order]
    assert batch["input_ids"].tolist() == [int(i) for k in order for i in pairs.sentence(k)]
    assert torch.equal(batch["labels"], torch.from_numpy(pairs.labels[[3, 0, 7]]))


def test_evaluation_split_needs_two_distinct_labels(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    constant = write_tsv(tmp_path / "const.tsv", [["a dog", "a cat", 1.0], ["a man", "a woman", 1.0]])
    data = PairDataModule(None, str(constant), None)
    data.tokenize_with(AutoTokenizer.from_pretrained(tiny_model_dir), 128)
    with pytest.raises(PairDataError, match="correlation of cosine with label is undefined"):
        data.setup("validate")
    single = write_tsv(tmp_path / "one.tsv", [["a dog", "a cat", 1.0]])
    data = PairDataModule(None, str(single), None)
    data.tokenize_with(AutoTokenizer.from_pretrained(tiny_model_dir), 128)
    with pytest.raises(PairDataError, match="at least 2 pairs"):
        data.setup("validate")


def test_missing_file_or_directory_is_a_data_error_before_the_cache(tokenizer, tmp_path):
    """The cache key reads the file first: that read must fail as clearly as the reader would."""
    for path, message in ((tmp_path / "nope.tsv", "nope.tsv: file not found; expected a .csv"),
                          (tmp_path, "is a directory, not a file; expected a .csv")):
        data = PairDataModule(str(path), None, None)
        data.tokenize_with(tokenizer, 128)
        with pytest.raises(PairDataError, match=message):
            data.setup("fit")


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.txt"])
def test_misnamed_file_fails_alike_with_a_cold_or_warm_cache(tokenizer, pair_files, tmp_path, monkeypatch, name):
    """Tab-separated bytes under another name: the format the name selects is part of the key."""
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    misnamed = tmp_path / name
    misnamed.write_bytes(pair_files["train"].read_bytes())
    with pytest.raises(PairDataError) as cold:
        load_tokenized(str(misnamed), tokenizer, 128)
    load_tokenized(str(pair_files["train"]), tokenizer, 128)  # the same bytes, now cached from the .tsv
    with pytest.raises(PairDataError) as warm:
        load_tokenized(str(misnamed), tokenizer, 128)
    assert str(warm.value) == str(cold.value)


def test_every_read_option_gives_the_same_result_cold_or_warm(tokenizer, tmp_path, monkeypatch):
    header = ("sentence_0", "sentence_1", "sentence1", "sentence2", "label", "score")
    path = str(write_tsv(tmp_path / "p.tsv", [["a dog", "a cat", "the man", "a woman", 0.5, 0.25],
                                              ["a car", "the road", "a child", "food", 1.0, 7],
                                              ["dogs run", "cats eat", "men play", "water", 0.0, 1.0]], header=header))
    variants = [ReadOptions(), ReadOptions(sentence_columns=["sentence1", "sentence2"]),
                ReadOptions(label_column="score"), ReadOptions(label_column="score", drop_invalid=True),
                ReadOptions(label_scale=2.0)]

    def load(options: ReadOptions, cache: str):
        monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / cache))
        try:
            with warnings.catch_warnings():  # drop_invalid warns when it reads; the count is kept in `dropped`
                warnings.simplefilter("ignore")
                pairs = load_tokenized(path, tokenizer, 128, options)
        except PairDataError as err:
            return str(err)
        return pairs.ids.tolist(), pairs.labels.tolist(), pairs.dropped

    warm = [load(options, "warm") for options in variants]  # each variant with every other one already cached
    assert len({repr(result) for result in warm}) == len(variants)  # each option changes the result
    assert [load(options, "warm") for options in variants] == warm
    assert [load(options, f"cold{i}") for i, options in enumerate(variants)] == warm


def HubDataset(fingerprint: str, label: float):
    """What `datasets.load_dataset` returns: a real Dataset, whose revision-dependent fingerprint is set here."""
    rows = {"sentence_0": ["a dog", "a man"], "sentence_1": ["a cat", "a woman"], "label": [label, 1.0]}
    return datasets.Dataset(datasets.table.InMemoryTable.from_pydict(rows), fingerprint=fingerprint)


def test_hub_dataset_is_keyed_by_its_fingerprint_and_loaded_once(tokenizer, monkeypatch):
    loads = []

    def load_dataset(name, config, split):
        loads.append((name, config, split))
        return hub[0]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub = [HubDataset("revision-1", 0.5)]
    assert load_tokenized("hf:org/pairs:en:train", tokenizer, 128).labels.tolist() == [0.5, 1.0]
    assert loads == [("org/pairs", "en", "train")]  # once for the key and the rows together
    hub[0] = HubDataset("revision-2", 0.25)  # the dataset changed on the Hub
    assert load_tokenized("hf:org/pairs:en:train", tokenizer, 128).labels.tolist() == [0.25, 1.0]
    monkeypatch.setattr(token_cache, "iter_pair_chunks", lambda *a, **k: pytest.fail("the cached entry was not used"))
    assert load_tokenized("hf:org/pairs:en:train", tokenizer, 128).labels.tolist() == [0.25, 1.0]


def test_batches_let_go_of_the_cache_pages_they_read_and_read_them_again(tokenizer, pair_files, monkeypatch,
                                                                         tmp_path):
    from minilm_sts.data.pair_datasets import RELEASE_EVERY
    from minilm_sts.data.token_cache import TokenizedPairs

    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    load_tokenized(str(pair_files["train"]), tokenizer, 128)
    pairs = load_tokenized(str(pair_files["train"]), tokenizer, 128)  # from the entry: memory-mapped
    assert len(pairs.maps) == 3 and np.array_equal(pairs.ids, np.load(next(cache_root().glob("*/ids.npy"))))
    dataset = PairDataset(pairs)
    first = dataset.collate([0, 1, 2])
    released = []
    monkeypatch.setattr(pairs, "release_pages", lambda: released.append(dataset.batches_made))
    for _ in range(2 * RELEASE_EVERY):
        dataset.collate([3, 4])
    assert released == [RELEASE_EVERY, 2 * RELEASE_EVERY]
    TokenizedPairs.release_pages(pairs)  # the real one: unmapped pages are mapped again on the next read
    again = dataset.collate([0, 1, 2])
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
