"""Distributed data parallel on CPU (gloo, 2 processes): it trains, and validation scores each whole set once,
with the metrics of a single process for graded and for binary labels, and for duplicate retrieval."""

import csv

import pytest

from helpers import cli, write_tsv

CSV_LOGGER = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs",
              "--trainer.enable_progress_bar", "false"]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def last_logged(run_dir) -> dict[str, float]:
    """The validation metrics of the newest run's last logged row that has them."""
    newest = max(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = [row for row in csv.DictReader(open(newest)) if row.get("val/spearman_cosine")]
    return {key: float(value) for key, value in rows[-1].items() if key.startswith("val/") and value}


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_fit_and_validation_equal_single_process(tiny_model_dir, pair_files, tmp_path):
    rows = list(csv.reader(open(pair_files["val"]), delimiter="\t"))[1:] + [["a dog runs", "a cat", "0.3"]]
    val13 = write_tsv(tmp_path / "val13.tsv", rows)  # 13 pairs: the 2 shards are padded with a repeated pair
    binary13 = write_tsv(tmp_path / "binary13.tsv", [[a, b, float(float(label) >= 0.5)] for a, b, label in rows])
    val_sets = f"{{graded: {val13}, duplicates: {binary13}}}"
    common = ["--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
              "--data.val_path", val_sets, "--data.test_path", "null", "--data.batch_size", "4", *CSV_LOGGER,
              "--data.forgetting_guard", "false", "--data.retrieval", "[duplicates]"]
    cli("fit", *common, *DDP, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.default_root_dir", "runs", cwd=tmp_path)
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    assert last_logged(tmp_path)["val/spearman_cosine"]  # validation ran under DDP

    cli("validate", *common, "--ckpt_path", str(checkpoint), cwd=tmp_path / "runs")
    single = last_logged(tmp_path / "runs")
    cli("validate", *common, *DDP, "--ckpt_path", str(checkpoint), cwd=tmp_path / "runs")
    both = last_logged(tmp_path / "runs")
    assert abs(single["val/spearman_cosine"] - both["val/spearman_cosine"]) <= 1e-6
    assert abs(single["val/pearson_cosine"] - both["val/pearson_cosine"]) <= 1e-6
    binary = {"cosine_accuracy", "cosine_accuracy_threshold", "cosine_f1", "cosine_precision", "cosine_recall",
              "cosine_f1_threshold", "cosine_ap", "cosine_mcc"}
    retrieval = {"cosine_mrr@10", "cosine_ndcg@10", "cosine_map@100", "cosine_recall@1", "cosine_recall@10",
                 "cosine_recall@100", "cosine_accuracy@1", "cosine_accuracy@10"}
    assert {f"val/duplicates/{name}" for name in binary | retrieval} <= set(single)
    assert set(both) == set(single)
    for key, value in single.items():
        assert abs(value - both[key]) <= 1e-6, key
