"""The callbacks every SentenceEncoderTraining brings: whole-split evaluation with the metrics that fit each set, the
run record, the validation before training that the forgetting guard asks for, and the guard against a
non-finite loss. (Resume, with the random stream, is in test_resume.py.)"""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.data.pairs import read_pairs
from minilm_sts.evaluation.binary import binary_classification
from minilm_sts.evaluation.retrieval import DuplicateRetrieval
from minilm_sts.model.checkpoint import read_run_record
from minilm_sts.serving.model_card import render_model_card
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import attached, write_tsv

BINARY_KEYS = set(binary_classification(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])))


def test_a_binary_set_logs_classification_metrics_without_being_asked(tiny_model_dir, pair_files, tmp_path):
    graded = read_pairs(str(pair_files["val"]))
    duplicates = write_tsv(tmp_path / "duplicates.tsv", [[a, b, float(label >= 0.5)] for a, b, label in
                                                         zip(graded.sentences_a, graded.sentences_b, graded.labels)])
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), {"graded": str(pair_files["val"]), "duplicates": str(duplicates)},
                          None, batch_size=8, forgetting_guard=False)
    trainer = L.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)

    logged = set(trainer.callback_metrics)
    assert {f"val/duplicates/{name}" for name in BINARY_KEYS} <= logged
    assert not any(key.startswith("val/graded/cosine_") or key.startswith("val/cosine_") for key in logged)
    assert {"val/pearson_cosine", "val/spearman_cosine", "val/graded/spearman_cosine",
            "val/duplicates/spearman_cosine"} <= logged
    sets = trainer.lightning_module.latest_evaluation["val"]
    assert list(sets) == ["graded", "duplicates"]  # the monitored (first) set first
    scored = sets["duplicates"]
    assert scored.metrics == binary_classification(scored.cosine, scored.labels) | {
        name: scored.metrics[name] for name in ("pearson_cosine", "spearman_cosine")}
    assert trainer.callback_metrics["val/duplicates/cosine_ap"].item() == pytest.approx(scored.metrics["cosine_ap"])
    record = attached(trainer, RunRecord).record
    assert record["evaluation"]["val"] == {name: s.metrics for name, s in sets.items()}
    assert set(record["log"][-1]) == {"epoch", "step", "training_loss", "pearson_cosine", "spearman_cosine"}


def test_a_set_named_for_retrieval_logs_its_metrics_each_validation_and_in_the_card(tiny_model_dir, pair_files,
                                                                                       tmp_path):
    """Retrieval over the set's sentences plus a corpus file, at every validation and in the test: the logged
    values are those of DuplicateRetrieval on the trained model, and the card lists them."""
    graded = read_pairs(str(pair_files["val"]))
    duplicates = write_tsv(tmp_path / "duplicates.tsv", [[a, b, float(label >= 0.5)] for a, b, label in
                                                         zip(graded.sentences_a, graded.sentences_b, graded.labels)])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a dog runs\nthe cat sleeps on the mat\n")
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), lr=1e-3)
    data = PairDataModule({"duplicates": str(pair_files["train"])},  # a training set of that name is not scored
                          {"graded": str(pair_files["val"]), "duplicates": str(duplicates)},
                          {"duplicates": str(duplicates)}, batch_size=8, forgetting_guard=False,
                          retrieval={"duplicates": str(corpus)})
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)

    table = read_pairs(str(duplicates))
    task = DuplicateRetrieval.from_pairs(table.sentences_a, table.sentences_b, table.labels,
                                         ["a dog runs", "the cat sleeps on the mat"])
    assert data.retrieval_task("val", "duplicates") == task and data.retrieval_task("val", "graded") is None
    assert data.retrieval_task("train", "duplicates") is None
    expected = task.evaluate(model.encode)
    logged = trainer.callback_metrics
    for name, value in expected.items():
        assert logged[f"val/duplicates/{name}"].item() == pytest.approx(value, abs=1e-6), name
    assert not any("mrr" in key for key in logged if not key.startswith("val/duplicates/"))
    record = attached(trainer, RunRecord).record
    assert len(record["log"]) == 2 and "cosine_mrr@10" not in record["log"][-1]  # the graded set is monitored
    trainer.test(model, data, verbose=False)
    assert trainer.callback_metrics["test/cosine_mrr@10"].item() == pytest.approx(expected["cosine_mrr@10"], abs=1e-6)
    card = render_model_card(model.hparams, attached(trainer, RunRecord).record)
    assert f"| cosine_mrr@10 | - | {expected['cosine_mrr@10']:.4f} | {expected['cosine_mrr@10']:.4f} |" in card
    assert "InformationRetrievalEvaluator): MRR@10" in card


def test_scores_are_whole_sets_in_pair_order(tiny_model_dir, pair_files):
    """Batches of 5 over 12 pairs: the set's scores come back whole, in pair order, equal to encode's cosines."""
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(None, str(pair_files["val"]), None, batch_size=5)
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    trainer.validate(model, data, verbose=False)
    scored = trainer.lightning_module.latest_evaluation["val"]["val"]
    table = read_pairs(str(pair_files["val"]))
    expected = (model.encode(table.sentences_a) * model.encode(table.sentences_b)).sum(1)
    assert torch.allclose(scored.cosine, expected, atol=1e-5)
    assert scored.labels.tolist() == pytest.approx(table.labels)
    assert trainer.callback_metrics["val/spearman_cosine"].item() == pytest.approx(scored.metrics["spearman_cosine"])


def test_a_checkpoint_without_a_record_reads_as_an_empty_one():
    assert read_run_record({"state_dict": {}}) == {"datasets": {}, "log": [], "evaluation": {}}


def test_a_non_finite_loss_stops_the_run_at_the_next_logging_step_naming_the_first(tiny_model_dir, pair_files,
                                                                                     tmp_path):
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    with torch.no_grad():
        model.sentence_encoder.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=2, forgetting_guard=False)
    trainer = L.Trainer(max_steps=10, log_every_n_steps=4, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, num_sanity_val_steps=0, enable_checkpointing=False,
                        limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 \(epoch 0, batch 0\); found at step 3"):
        trainer.fit(model, data)
    assert trainer.global_step == 4  # the fourth step is a logging step: the guard read its flag there


class PoisonWeightsAt(L.Callback):
    """Makes the loss NaN from step `step` on, as an overflowing run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.sentence_encoder.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")


def test_no_checkpoint_holds_weights_trained_on_a_non_finite_loss(tiny_model_dir, pair_files, tmp_path):
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=2, forgetting_guard=False)
    every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[every_step, PoisonWeightsAt(3)])
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 .*No checkpoint holds weights trained on"):
        trainer.fit(model, data)
    assert sorted(path.name for path in tmp_path.glob("step=*.ckpt")) == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3


def guarded_fit(model_dir, pair_files, root, forgetting_guard=True):
    """Two steps on the small pair files, validating after the second, logged to CSV in `root`."""
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(model_dir), lr=1e-3)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8,
                          forgetting_guard=forgetting_guard)
    best = ModelCheckpoint(dirpath=root, monitor="val/spearman_cosine", mode="max", filename="best")
    trainer = L.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, logger=CSVLogger(root),
                        callbacks=[best], enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as handle:
        return model, trainer, list(csv.DictReader(handle))


@pytest.mark.slow
def test_the_forgetting_guard_is_validated_before_and_after_training_and_changes_nothing_else(
        tiny_model_dir, pair_files, tmp_path):
    model, trainer, rows = guarded_fit(tiny_model_dir, pair_files, tmp_path / "guarded")
    validations = [row for row in rows if row.get("val/stsb/spearman_cosine")]
    assert [int(row["step"]) for row in validations][0] == 0 and len(validations) == 2  # before the first step, after
    assert all(row["val/spearman_cosine"] == row["val/val/spearman_cosine"] for row in validations)  # the user's set
    assert list(trainer.lightning_module.latest_evaluation["val"]) == ["val", "stsb"]
    record = attached(trainer, RunRecord).record
    assert [row["step"] for row in record["log"]] == [2]  # the training log holds trained steps only
    assert record["before_training"]["stsb"]["spearman_cosine"] == pytest.approx(
        float(validations[0]["val/stsb/spearman_cosine"]))
    assert record["evaluation"]["val"]["stsb"]["spearman_cosine"] == pytest.approx(
        float(validations[1]["val/stsb/spearman_cosine"]))
    assert [d["source"] for d in record["datasets"]["val"]] == [str(pair_files["val"]), "builtin:stsb/dev"]

    base = Trainer(logger=False, enable_progress_bar=False)  # the pass before training scored the base model
    base.validate(SentenceEncoderTraining(pretrained=str(tiny_model_dir)), PairDataModule(
        str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8), verbose=False)
    base_scores = base.lightning_module.latest_evaluation["val"]
    assert record["before_training"] == {name: s.metrics for name, s in base_scores.items()}

    unguarded, plain_trainer, plain_rows = guarded_fit(tiny_model_dir, pair_files, tmp_path / "plain", False)
    assert not any(key.startswith("val/stsb/") for row in plain_rows for key, value in row.items() if value)
    assert "before_training" not in attached(plain_trainer, RunRecord).record
    for (name, a), b in zip(model.state_dict().items(), unguarded.state_dict().values()):  # dropout drew the same
        assert torch.equal(a, b), name
    assert attached(plain_trainer, RunRecord).record["log"] == record["log"]

    card = render_model_card(model.hparams, record)
    before, after = record["before_training"]["stsb"], record["evaluation"]["val"]["stsb"]
    assert (f"**Forgetting guard:** STS-B dev (`builtin:stsb/dev`) spearman_cosine {before['spearman_cosine']:.4f} "
            f"before training → {after['spearman_cosine']:.4f} after (step 2).") in card
    assert "Forgetting guard" not in render_model_card(unguarded.hparams, attached(plain_trainer, RunRecord).record)
