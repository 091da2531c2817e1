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
                          test_path=None, batch_size=8, monitor_val="second")
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
