"""Distributed data parallel on CPU (gloo, 2 processes): it trains, and validation scores the whole set once."""

import csv

import pytest

from conftest import write_tsv
from test_cli import cli

CSV_LOGGER = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "runs",
              "--trainer.enable_progress_bar", "false"]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def last_logged(run_dir, key: str) -> float:
    newest = max(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return float([row[key] for row in csv.DictReader(open(newest)) if row.get(key)][-1])


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_fit_and_validation_equal_single_process(tiny_model_dir, pair_files, tmp_path):
    rows = list(csv.reader(open(pair_files["val"]), delimiter="\t"))[1:] + [["a dog runs", "a cat", "0.3"]]
    val13 = write_tsv(tmp_path / "val13.tsv", rows)  # 13 pairs: the 2 shards are padded with a repeated pair
    common = ["--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
              "--data.val_path", str(val13), "--data.test_path", "null", "--data.batch_size", "4", *CSV_LOGGER]
    cli("fit", *common, *DDP, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.default_root_dir", "runs", cwd=tmp_path)
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    assert last_logged(tmp_path, "val/spearman_cosine")  # validation ran under DDP

    cli("validate", *common, "--ckpt_path", str(checkpoint), cwd=tmp_path / "runs")
    single = (last_logged(tmp_path / "runs", "val/spearman_cosine"), last_logged(tmp_path / "runs", "val/pearson_cosine"))
    cli("validate", *common, *DDP, "--ckpt_path", str(checkpoint), cwd=tmp_path / "runs")
    both = (last_logged(tmp_path / "runs", "val/spearman_cosine"), last_logged(tmp_path / "runs", "val/pearson_cosine"))
    assert abs(single[0] - both[0]) <= 1e-6 and abs(single[1] - both[1]) <= 1e-6
