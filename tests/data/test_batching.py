"""The training batch plan: every row once per epoch, from (seed, epoch) alone, resumed exactly, and for losses with
in-batch negatives without a sentence twice in a batch."""

import random

import numpy as np
import pytest

from minilm_sts.data.batching import PairBatches, distinct_sentence_batches

from helpers import duplicates_file


def sentence_numbers(table):
    numbers = {}
    return np.array([[numbers.setdefault(a, len(numbers)), numbers.setdefault(b, len(numbers))] for a, b, _ in table])


@pytest.mark.parametrize("batch_size", [2, 4, 8, 16])
def test_distinct_sentence_batches_keep_every_row_once_and_never_repeat_a_sentence(batch_size):
    rng = random.Random(batch_size)
    ids = np.array([[rng.randrange(60), rng.randrange(60)] for _ in range(100)])
    order = list(range(100))
    rng.shuffle(order)
    batches = distinct_sentence_batches(order, ids, batch_size)
    assert sorted(row for batch in batches for row in batch) == list(range(100))
    for batch in batches:
        assert 2 <= len(batch) <= batch_size + 1
        sentences = ids[batch].flatten().tolist()
        own = sum(a == b for a, b in ids[batch].tolist())  # a pair of a sentence with itself repeats it once
        assert len(sentences) - len(set(sentences)) == own
    assert len(batches[0]) == batch_size  # filled greedily, not scattered


def test_a_row_alone_joins_a_batch_it_does_not_clash_with_or_sits_the_epoch_out_with_a_warning():
    ids = np.array([[0, 1], [2, 3], [4, 5], [4, 6], [7, 8]])
    assert distinct_sentence_batches([0, 1, 2, 3, 4], ids, 2) == [[0, 1, 3], [2, 4]]  # 3 waited, then was alone
    with pytest.warns(UserWarning, match=r"^1 training pair\(s\) share a sentence with every batch .* row\(s\) 3$"):
        assert distinct_sentence_batches([0, 1, 2, 3], ids, 2) == [[0, 1, 2]]


def test_rows_that_sit_an_epoch_out_are_counted_in_one_warning(recwarn):
    # Sentence 0 is in 14 pairs, and only 2 batches form: 12 of those pairs find no batch without it.
    ids = np.array([[0, 100 + i] for i in range(14)] + [[200 + i, 300 + i] for i in range(4)])
    batches = distinct_sentence_batches(list(range(18)), ids, 3)
    placed = sorted(row for batch in batches for row in batch)
    assert [str(w.message) for w in recwarn] == [
        "12 training pair(s) share a sentence with every batch of this epoch and sit it out: row(s) "
        + ", ".join(str(row) for row in [r for r in range(14) if r not in placed][:10]) + ", ..."]
    assert len(placed) == 18 - 12


def test_the_plan_depends_on_seed_and_epoch_and_resumes_exactly(tmp_path):
    _, table = duplicates_file(tmp_path / "d.tsv")
    ids = sentence_numbers(table)
    make = lambda done, seed=42: PairBatches([len(ids)], 8, seed=seed, mode="round_robin",  # noqa: E731
                                             batches_done=lambda: done, sentence_ids=[ids])
    batches = make(3)
    epoch0 = list(batches)
    assert epoch0 == list(make(0)) and epoch0 != list(make(0, seed=7))
    assert len(batches) == len(epoch0)
    for batch in epoch0:
        sentences = ids[batch].flatten().tolist()
        assert len(sentences) - len(set(sentences)) == sum(a == b for a, b in ids[batch].tolist())
    batches.set_epoch(1)
    epoch1 = list(batches)
    assert epoch1 != epoch0 and len(batches) == len(epoch1)
    again = make(0)
    again.load_state_dict(batches.state_dict())  # {"epoch": 1, "batches_done": 3}
    again.set_epoch(1)
    assert list(again) == epoch1[3:]


def test_an_epoch_plan_takes_about_four_bytes_a_pair():
    batches = PairBatches([2_000_000, 10], 32, seed=0, mode="round_robin", batches_done=lambda: 0)
    plan = batches._epoch_plan()
    held = sum(a.nbytes for a in (*plan.rows, *plan.bounds, plan.offsets, plan.sequence))
    assert plan.rows[0].dtype == np.int32 and held / 2_000_010 < 4.5
    first = next(iter(batches))
    assert len(first) == 32 and all(isinstance(i, int) for i in first)  # Python ints, as the collate expects


def test_hashed_sentence_ids_say_which_sentences_tokenize_alike(tmp_path):
    from minilm_sts.data.pair_datasets import PairDataset
    from minilm_sts.data.token_cache import TokenizedPairs

    sentences = [[2, 5, 3], [2, 6, 3], [2, 5, 3], [2, 5, 5, 3], [2, 3], [2, 5, 3], [2, 3, 5]]
    sentences.append([2, 5, 3])  # 4 pairs
    offsets = np.cumsum([0] + [len(s) for s in sentences])
    pairs = TokenizedPairs(np.concatenate(sentences).astype(np.uint16), offsets, np.zeros(4, dtype=np.float32))
    for block in (1, 3, 1 << 18):
        ids = PairDataset(pairs).sentence_ids(block=block).ravel()
        same = ids[:, None] == ids[None, :]
        expected = np.array([[a == b for b in sentences] for a in sentences])
        assert np.array_equal(same, expected)
    assert PairDataset(pairs, rows=np.array([3, 0])).sentence_ids().tolist() == ids.reshape(4, 2)[[3, 0]].tolist()
