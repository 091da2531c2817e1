"""The token cache: a second load skips reading and tokenizing; any change of input or options misses;
a damaged entry is rebuilt, never used."""

import numpy as np
import pytest
import torch

import minilm_sts.tokenized as tokenized
from minilm_sts.datamodule import PairDataset
from minilm_sts.pairs import PairDataError
from minilm_sts.tokenized import cache_root, load_tokenized


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_second_load_comes_from_cache(tokenizer, pair_files, monkeypatch):
    first = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    monkeypatch.setattr(tokenized, "read_pairs", lambda *a, **k: pytest.fail("the cached entry was not used"))
    second = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.labels, second.labels)
    assert len(second) == 40


def test_changed_content_or_options_miss_the_cache(tokenizer, pair_files):
    path = str(pair_files["train"])
    base = load_tokenized(path, tokenizer, 128)
    assert load_tokenized(path, tokenizer, 4).ids.size < base.ids.size
    assert load_tokenized(path, tokenizer, 128, label_scale=2.0).labels[0] == pytest.approx(base.labels[0] / 2)
    with open(path, "a") as handle:
        handle.write("a dog\ta cat\t0.5\n")
    assert len(load_tokenized(path, tokenizer, 128)) == 41


def test_damaged_entry_is_rebuilt(tokenizer, pair_files, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    path = str(pair_files["train"])
    good = load_tokenized(path, tokenizer, 128)
    (entry,) = cache_root().iterdir()
    (entry / "ids.npy").write_bytes(b"truncated")
    rebuilt = load_tokenized(path, tokenizer, 128)
    assert np.array_equal(rebuilt.ids, good.ids)


def test_collate_packs_column_a_then_column_b(tokenizer, pair_files):
    pairs = load_tokenized(str(pair_files["train"]), tokenizer, 128)
    batch = PairDataset(pairs).collate([3, 0, 7])
    order = (6, 0, 14, 7, 1, 15)  # sentence A of pairs 3, 0, 7, then their sentence B
    assert batch["lengths"].tolist() == [len(pairs.sentence(k)) for k in order]
    assert batch["input_ids"].tolist() == [int(i) for k in order for i in pairs.sentence(k)]
    assert torch.equal(batch["labels"], torch.from_numpy(pairs.labels[[3, 0, 7]]))


def test_evaluation_split_needs_two_distinct_labels(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from conftest import write_tsv
    from minilm_sts.datamodule import PairDataModule

    constant = write_tsv(tmp_path / "const.tsv", [["a dog", "a cat", 1.0], ["a man", "a woman", 1.0]])
    data = PairDataModule(None, str(constant), None)
    data.tokenizer, data.max_seq_length = AutoTokenizer.from_pretrained(tiny_model_dir), 128
    with pytest.raises(PairDataError, match="correlation of cosine with label is undefined"):
        data.setup("validate")
    single = write_tsv(tmp_path / "one.tsv", [["a dog", "a cat", 1.0]])
    data = PairDataModule(None, str(single), None)
    data.tokenizer, data.max_seq_length = AutoTokenizer.from_pretrained(tiny_model_dir), 128
    with pytest.raises(PairDataError, match="at least 2 pairs"):
        data.setup("validate")
