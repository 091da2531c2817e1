"""PairDataModule for a loss with in-batch negatives (mnrl): positive pairs only, counted, and batches in which no
sentence occurs twice, planned from (seed, epoch) alone and resumed exactly. And the `retrieval` option's checks,
which stop a run before training."""

import logging
import random

import lightning as L
import numpy as np
import pytest

from minilm_sts.datamodule import PairBatches, PairDataModule, distinct_sentence_batches
from minilm_sts.errors import UserInputError
from minilm_sts.module import SentenceEmbedder

from helpers import write_tsv


def duplicates_file(path, rows=60, distinct=25, seed=0):
    """Pairs over a small pool of sentences, so that many share one; every third row labelled 0, others graded."""
    rng = random.Random(seed)
    pool = [f"the man plays {' '.join(rng.choices(['dog', 'cat', 'guitar', 'with', 'a'], k=4))} {i}"
            for i in range(distinct)]
    table = [[pool[rng.randrange(distinct)], pool[rng.randrange(distinct)], 0.0 if i % 3 == 0 else round(rng.uniform(0.1, 1), 2)]
             for i in range(rows)]
    return write_tsv(path, table), table


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
    with pytest.warns(UserWarning, match="training pair 3 shares a sentence with every batch of this epoch"):
        assert distinct_sentence_batches([0, 1, 2, 3], ids, 2) == [[0, 1, 2]]


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


def fit(model_dir, train, val, loss, batch_size=8):
    L.seed_everything(0)
    model = SentenceEmbedder(pretrained=str(model_dir), loss=loss)
    data = PairDataModule(str(train), str(val), None, batch_size=batch_size)
    seen = []

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Batches()])
    trainer.fit(model, data)
    return data, seen


def test_mnrl_trains_on_positive_rows_only_without_a_repeated_sentence_in_a_batch(tiny_model_dir, pair_files,
                                                                                 tmp_path, caplog, monkeypatch):
    path, table = duplicates_file(tmp_path / "d.tsv")
    zeros = sum(label == 0 for *_, label in table)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # to caplog's handler
    with caplog.at_level(logging.INFO):
        data, batches = fit(tiny_model_dir, path, pair_files["val"], "mnrl")
    assert f"train: {zeros} rows labelled 0 left out of {path}: a loss with in-batch negatives uses positive pairs " \
           "only" in caplog.text
    trained = data.datasets["train"]["d"]
    assert len(trained) == len(table) - zeros and data.describe("train")[0]["left_out"] == zeros
    assert sorted(i for batch in batches for i in batch["indices"].tolist()) == list(range(len(trained)))
    for batch in batches:
        assert (batch["labels"] > 0).all() and len(batch["labels"]) >= 2
        rows = trained.rows[batch["indices"].numpy()]
        texts = [table[r][0] for r in rows] + [table[r][1] for r in rows]
        assert len(texts) - len(set(texts)) == sum(table[r][0] == table[r][1] for r in rows)


def test_other_losses_train_on_every_row_in_plain_batches(tiny_model_dir, pair_files, tmp_path):
    path, table = duplicates_file(tmp_path / "d.tsv")
    data, batches = fit(tiny_model_dir, path, pair_files["val"], "cosent")
    assert len(data.datasets["train"]["d"]) == len(table) and data.describe("train")[0]["left_out"] == 0
    assert [len(batch["labels"]) for batch in batches] == [8] * 7 + [4]


@pytest.mark.parametrize("labels, batch_size, message", [
    ([0.0] * 11 + [1.0], 8, "a loss with in-batch negatives trains on pairs labelled above 0, and this set has 1"),
    ([1.0] * 12, 1, "batch_size must be at least 2, got 1"),
])
def test_mnrl_needs_two_positive_rows_and_batches_of_two(tiny_model_dir, pair_files, tmp_path, labels, batch_size,
                                                         message):
    rows = [[f"a dog {i}", f"a cat {i}", label] for i, label in enumerate(labels)]
    path = write_tsv(tmp_path / "few.tsv", rows)
    with pytest.raises(UserInputError, match=message):
        fit(tiny_model_dir, path, pair_files["val"], "mnrl", batch_size=batch_size)


def test_retrieval_names_an_evaluation_set(pair_files):
    with pytest.raises(UserInputError, match=r"retrieval names \['dev'\], which are not evaluation sets; they are \['val', 'stsb'\]"):
        PairDataModule(str(pair_files["train"]), str(pair_files["val"]), retrieval=["dev"])


def test_a_retrieval_set_without_a_duplicate_stops_the_run_before_training(tiny_model_dir, pair_files):
    """The graded fixture has no pair labelled 1: there is no query, said before the first step."""
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), retrieval=["val"], forgetting_guard=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(UserInputError, match=r"val.tsv: cannot score it as duplicate retrieval: no pair is labelled >= 1"):
        trainer.fit(model, data)
    assert trainer.global_step == 0
