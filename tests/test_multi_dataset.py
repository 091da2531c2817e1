"""Several training sets (batches take turns) and several validation sets (each logged under its name)."""

import lightning as L
import pytest

from minilm_sts.datamodule import PairDataModule, source_name
from minilm_sts.module import SentenceEmbedder
from minilm_sts.module_callbacks import RunRecord
from minilm_sts.pairs import PairDataError


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
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
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
    sources = [d["source"] for d in RunRecord.of(trainer).record["datasets"]["train"]]
    assert sources == [str(pair_files["train"]), str(pair_files["val"])]


def test_the_forgetting_guard_joins_the_validation_sets_only_when_training_on_other_data(pair_files):
    train, val = str(pair_files["train"]), str(pair_files["val"])
    guarded = PairDataModule(train, val, None)
    assert guarded.guard == "stsb" and guarded.sources["val"] == {"val": val, "stsb": "builtin:stsb/dev"}
    assert guarded.eval_names("val") == ["val", "stsb"]  # the user's set stays first: the monitored one
    assert PairDataModule(train, val, None, monitor_val="stsb").eval_names("val") == ["stsb", "val"]  # if asked
    unguarded = [(("val",), PairDataModule(train, val, None, forgetting_guard=False)),  # switched off
                 (("val",), PairDataModule(["builtin:stsb/train", train], val, None)),  # training on STS-B
                 (("mine", "dev"), PairDataModule(train, {"mine": val, "dev": "builtin:stsb/dev"}, None)),  # validated on
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
    data.tokenizer, data.max_seq_length = AutoTokenizer.from_pretrained(str(tiny_model_dir)), 128
    data.setup("validate")
    assert data.datasets["val"]["scores"].pairs.labels.tolist() == pytest.approx([0.9, 0.1])
    guard = data.datasets["val"]["stsb"].pairs
    assert len(guard) == 1500 and 0 <= guard.labels.min() and guard.labels.max() == pytest.approx(1.0)
