"""PairDataModule for a loss with in-batch negatives (mnrl): positive pairs only, counted, in batches in which no
sentence occurs twice (the plan itself is tested in test_batching.py). And the `retrieval` option's checks, which
stop a run before training."""

import logging

import lightning as L
import numpy as np
import pytest

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.errors import UserInputError
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import duplicates_file, write_tsv


def fit(model_dir, train, val, loss, batch_size=8):
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(model_dir), loss=loss)
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
    with pytest.raises(UserInputError,
                       match=r"retrieval names \['dev'\], which are not evaluation sets; they are \['val', 'stsb'\]"):
        PairDataModule(str(pair_files["train"]), str(pair_files["val"]), retrieval=["dev"])


def test_a_retrieval_set_without_a_duplicate_stops_the_run_before_training(tiny_model_dir, pair_files):
    """The graded fixture has no pair labelled 1: there is no query, said before the first step."""
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), retrieval=["val"], forgetting_guard=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(UserInputError,
                       match=r"val.tsv: cannot score it as duplicate retrieval: no pair is labelled >= 1"):
        trainer.fit(model, data)
    assert trainer.global_step == 0


def test_a_retrieval_corpus_beyond_the_stated_size_stops_the_run_before_training(tiny_model_dir, pair_files, tmp_path):
    from transformers import AutoTokenizer

    duplicates = write_tsv(tmp_path / "dup.tsv", [[f"a dog {i}", f"a cat {i}", float(i % 2)] for i in range(12)])
    for limit in (23, 24):
        data = PairDataModule(str(pair_files["train"]), str(duplicates), retrieval=["dup"], forgetting_guard=False,
                              retrieval_max_corpus=limit)
        data.tokenize_with(AutoTokenizer.from_pretrained(str(tiny_model_dir)), 16)
        if limit == 23:
            with pytest.raises(UserInputError, match=r"dup.tsv: scored as duplicate retrieval, its corpus of 24 "
                                                     r"sentences would be embedded .* above retrieval_max_corpus=23"):
                data.setup("fit")
        else:
            data.setup("fit")
            assert len(data.retrieval_task("val", "dup").corpus) == 24


def test_set_up_by_hand_it_asks_for_its_tokenizer_then_works(tiny_model_dir, pair_files):
    from transformers import AutoTokenizer

    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    with pytest.raises(UserInputError, match=r"call data\.tokenize_with\(model\.tokenizer, model\.max_seq_length\)"):
        data.setup("fit")
    data.tokenize_with(AutoTokenizer.from_pretrained(str(tiny_model_dir)), 16)
    data.setup("fit")
    pairs = data.datasets["train"]["train"].pairs
    assert len(pairs) == 40 and np.diff(pairs.offsets).max() <= 16  # the max length given, 16 tokens
    batch = next(iter(data.val_dataloader()))
    assert batch["lengths"].max() <= 16 and len(batch["labels"]) == 8


def test_a_fit_tells_the_data_the_models_in_batch_negative_sets(tiny_model_dir, tmp_path):
    """Given its own tokenizer by hand, the data still learns from the model which sets train with mnrl."""
    from transformers import AutoTokenizer

    train, _ = duplicates_file(tmp_path / "dups.tsv")
    data = PairDataModule(str(train), str(train), None, batch_size=4, forgetting_guard=False)
    data.tokenize_with(AutoTokenizer.from_pretrained(str(tiny_model_dir)), 128)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss="mnrl")
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(model, data)
    assert data.in_batch_negatives == {"dups"}
