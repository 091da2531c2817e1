"""Several training sets (batches take turns, each set with the run's loss or its own) and several validation sets
(each logged under its name)."""

import lightning as L
import pytest

from minilm_sts.data.pair_data_module import PairDataModule, source_name
from minilm_sts.data.pairs import read_pairs
from minilm_sts.errors import PairDataError, UserInputError
from minilm_sts.serving.model_card import render_model_card
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import attached, write_tsv


def test_names_of_sources():
    assert source_name("builtin:stsb/dev") == "stsb-dev"
    assert source_name("/data/quora/dev.tsv.gz") == "dev"
    assert source_name("hf:sentence-transformers/stsb:validation") == "sentence-transformers-stsb-validation"
    with pytest.raises(PairDataError, match="share a name"):
        PairDataModule(val_path=["a/dev.tsv", "b/dev.tsv"])
    with pytest.raises(PairDataError, match="monitor_val 'x' is not a validation set"):
        PairDataModule(val_path={"a": "a.tsv"}, monitor_val="x")


def test_two_train_and_two_validation_sets(tiny_model_dir, pair_files, tmp_path):
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(train_path=[str(pair_files["train"]), str(pair_files["val"])],
                          val_path={"first": str(pair_files["train"]), "second": str(pair_files["val"])},
                          test_path=None, batch_size=8, monitor_val="second", forgetting_guard=False)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    assert trainer.global_step == 2 * 2  # round robin: 2 rounds (the 12-pair set has 2 batches) of 2 datasets
    metrics = trainer.callback_metrics
    for name in ("first", "second"):
        assert f"val/{name}/spearman_cosine" in metrics and f"val/{name}/pearson_cosine" in metrics
    assert metrics["val/spearman_cosine"] == metrics["val/second/spearman_cosine"]  # the monitored set
    assert metrics["val/spearman_cosine"] != metrics["val/first/spearman_cosine"]
    sources = [d["source"] for d in attached(trainer, RunRecord).record["datasets"]["train"]]
    assert sources == [str(pair_files["train"]), str(pair_files["val"])]


def test_the_forgetting_guard_joins_the_validation_sets_only_when_training_on_other_data(pair_files):
    train, val = str(pair_files["train"]), str(pair_files["val"])
    guarded = PairDataModule(train, val, None)
    assert guarded.guard == "stsb" and guarded.sources["val"] == {"val": val, "stsb": "builtin:stsb/dev"}
    assert guarded.eval_names("val") == ["val", "stsb"]  # the user's set stays first: the monitored one
    assert PairDataModule(train, val, None, monitor_val="stsb").eval_names("val") == ["stsb", "val"]  # if asked
    unguarded = [(("val",), PairDataModule(train, val, None, forgetting_guard=False)),  # switched off
                 (("val",), PairDataModule(["builtin:stsb/train", train], val, None)),  # training on STS-B
                 (("mine", "dev"),
                  PairDataModule(train, {"mine": val, "dev": "builtin:stsb/dev"}, None)),  # validated on
                 (("val",), PairDataModule(None, val, None)),  # not training
                 ((), PairDataModule(train, None, None))]  # not validating
    for names, data in unguarded:
        assert data.guard is None and tuple(data.sources["val"]) == names
    with pytest.raises(PairDataError, match="named 'stsb', the name of the forgetting guard"):
        PairDataModule(train, {"stsb": val}, None)


def test_the_forgetting_guard_reads_stsb_whatever_the_options_for_the_users_files(tiny_model_dir, tmp_path):
    """The user's file has its own column names and 0-5 labels; the guard set is read as packaged."""
    from transformers import AutoTokenizer

    user = tmp_path / "scores.tsv"
    user.write_text("q1\tq2\tgold\na man\ta dog\t4.5\nthe cat\tthe car\t0.5\n", encoding="utf-8")
    data = PairDataModule(str(user), str(user), None, sentence_columns=["q1", "q2"], label_column="gold",
                          label_scale=5.0)
    data.tokenize_with(AutoTokenizer.from_pretrained(str(tiny_model_dir)), 128)
    data.setup("validate")
    assert data.datasets["val"]["scores"].pairs.labels.tolist() == pytest.approx([0.9, 0.1])
    guard = data.datasets["val"]["stsb"].pairs
    assert len(guard) == 1500 and 0 <= guard.labels.min() and guard.labels.max() == pytest.approx(1.0)


def test_each_training_set_trains_with_its_own_loss(tiny_model_dir, pair_files, tmp_path):
    """loss {dups: mnrl, graded: cosent}: each batch goes to its set's loss, the mnrl set keeps its positive rows
    without a repeated sentence, the other keeps every row, and the card names each set's loss."""
    graded = read_pairs(str(pair_files["train"]))
    dups = write_tsv(tmp_path / "dups.tsv", [[a, b, float(label >= 0.5)] for a, b, label in
                                             zip(graded.sentences_a, graded.sentences_b, graded.labels)])
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss={"dups": "mnrl", "graded": "cosent"},
                             loss_params={"dups": {"scale": 10.0}})
    calls = []

    def recording(name, loss):
        def record(u, v, labels, **step_inputs):
            calls.append((name, labels.clone()))
            return loss(u, v, labels, **step_inputs)
        record.inputs, record.mini_batch_size = loss.inputs, loss.mini_batch_size  # what the step asks of a loss
        return record

    model._losses = {name: recording(name, loss) for name, loss in model._losses.items()}
    data = PairDataModule({"dups": str(dups), "graded": str(pair_files["train"])}, str(pair_files["val"]), None,
                          batch_size=8, forgetting_guard=False)
    # Logging every 2nd of round-robin steps: each logging step draws the same set, yet both sets' curves appear.
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, log_every_n_steps=2)
    trainer.fit(model, data)

    positives = sum(label >= 0.5 for label in graded.labels)
    assert len(data.datasets["train"]["dups"]) == positives and len(data.datasets["train"]["graded"]) == 40
    assert [name for name, _ in calls] == ["dups", "graded"] * (len(calls) // 2)  # round robin
    assert all((labels == 1).all() for name, labels in calls if name == "dups")
    assert any(((labels > 0) & (labels < 1)).any() for name, labels in calls if name == "graded")
    assert {"train/loss", "train/dups/loss", "train/graded/loss"} <= set(trainer.logged_metrics)
    card = render_model_card(model.hparams, attached(trainer, RunRecord).record)
    assert "- loss:MultipleNegativesRankingLoss\n- loss:CoSENTLoss\n" in card
    blocks = card.split("### Evaluation Dataset")[0].split("#### ")[1:]
    assert "(minilm_sts `mnrl`)" in blocks[0] and '"scale": 10.0' in blocks[0] and "CoSENTLoss" not in blocks[0]
    assert "(minilm_sts `cosent`)" in blocks[1] and '"scale": 20.0' in blocks[1]
    assert "Loss:" not in card.split("### Evaluation Dataset")[1].split("### Training Hyperparameters")[0]


def test_one_loss_per_set_must_name_every_training_set(tiny_model_dir, pair_files):
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss={"dups": "mnrl"})
    data = PairDataModule({"dups": str(pair_files["train"]), "graded": str(pair_files["val"])}, str(pair_files["val"]),
                          forgetting_guard=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(UserInputError,
                       match=r"loss names the training sets \['dups'\], but they are \['dups', 'graded'\]"):
        trainer.fit(model, data)
