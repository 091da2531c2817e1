"""The command line: recipes resolve, fit runs end to end (twice in one folder), and never imports the oracle."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from wandb_records import run_content

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "minilm_sts", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def resolved(*args: str) -> dict:
    return yaml.safe_load(cli("fit", *args, "--print_config").stdout)


def test_no_argument_default_is_the_stsb_recipe():
    default = resolved()
    assert default == resolved("--config", "configs/stsb.yaml")
    assert default["data"]["train_path"] == "builtin:stsb/train" and default["data"]["test_path"] == "builtin:stsb/test"
    assert default["model"]["lr"] == 5e-5 and default["data"]["batch_size"] == 32
    assert default["seed_everything"] == 42 and default["trainer"]["max_epochs"] == 1
    assert default["trainer"]["check_val_every_n_epoch"] is None
    assert default["checkpoint"]["monitor"] == "val/spearman_cosine" and default["checkpoint"]["save_last"] is False
    assert default["periodic_checkpoint"]["save_last"] is True  # the one writer of last.ckpt


def test_stackexchange_recipes_state_what_they_reproduce():
    card = resolved("--config", "configs/stackexchange.yaml")
    assert card["trainer"]["precision"] == "16-mixed" and card["trainer"]["val_check_interval"] == 500
    assert (card["model"]["lr"], card["model"]["warmup_steps"], card["model"]["weight_decay"]) == (5e-5, 0, 0.0)
    assert card["model"]["fused_optimizer"] and card["model"]["max_grad_norm"] == 1.0
    fit = resolved("--config", "configs/stackexchange_fit.yaml")
    assert (fit["model"]["lr"], fit["model"]["warmup_steps"], fit["model"]["weight_decay"]) == (2e-5, 10000, 0.01)
    assert fit["model"]["decay_bias_and_norm"] is False
    for recipe in ("stackexchange", "stackexchange_fit"):
        assert (ROOT / "configs" / f"{recipe}.yaml").read_text().startswith("# ")


def test_unknown_config_key_is_rejected():
    result = cli("fit", "--model.learning_rate", "1e-4", "--print_config", check=False)
    assert result.returncode != 0 and "learning_rate" in result.stderr


FIT_SCRIPT = """
import sys
from minilm_sts.cli import main
cli = main()  # reads sys.argv, as `python -m minilm_sts` does
assert "sentence_transformers" not in sys.modules, "minilm_sts imported the reference"
print("PRECISION", cli.trainer.precision)
"""


@pytest.mark.slow
def test_fit_runs_twice_in_one_folder_with_offline_wandb(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    """The default logger is W&B; with no credentials it runs offline and says how to sync."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    args = ["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
            "--data.val_path", str(pair_files["val"]), "--data.batch_size", "8", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false", "--model.lr", "1e-3"]
    for run in range(1, 3):
        result = subprocess.run([sys.executable, "-c", FIT_SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "PRECISION 32-true" in result.stdout
        assert "logs offline" in result.stdout + result.stderr and "wandb sync" in result.stdout + result.stderr
        run_files = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(run_files) == run
        config, metrics = run_content(run_files[-1])
        cli_config = json.loads(config["cli"])
        assert cli_config["model"]["lr"] == 1e-3 and cli_config["data"]["batch_size"] == 8  # the resolved config
        assert cli_config["trainer"]["val_check_interval"] == 2 and cli_config["checkpoint"]["mode"] == "max"
        assert {"train/loss", "train/lr", "train/grad_norm", "train/pairs_per_sec", "train/tokens_per_sec",
                "val/pearson_cosine", "val/spearman_cosine", "trainer/global_step"} <= metrics
        assert any(key.startswith("val/cosine_vs_label") for key in metrics)
    run_dirs = sorted(p for p in (tmp_path / "runs" / "minilm-sts").iterdir())
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        names = {p.name for p in (run_dir / "checkpoints").iterdir()}
        assert "last.ckpt" in names and any(n.startswith("step") and n.endswith(".ckpt") for n in names)
        assert not [n for n in names if n.startswith("last-v")]  # one last.ckpt, not one per callback
        last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 5  # the run's final step (40 pairs in batches of 8), not the last 200th
        assert {"cosine_vs_label_step2.png", "cosine_vs_label_step4.png"} <= names


def test_logger_can_be_switched_off(tiny_model_dir, pair_files, tmp_path):
    cli("fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
        "--data.val_path", str(pair_files["val"]), "--trainer.max_steps", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert not (tmp_path / "runs" / "wandb").exists()
    assert any((tmp_path / "runs").rglob("last.ckpt"))


def test_bad_data_fails_before_training(tiny_model_dir, pair_files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence_0\tsentence_1\tlabel\na dog\ta cat\t0.5\na dog\ta cat\tabc\n")
    result = cli("fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(bad),
                 "--data.val_path", str(pair_files["val"]), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"{bad}, line 3, column 'label': expected a finite number, got 'abc'" in result.stderr
    assert "Epoch 0" not in result.stdout + result.stderr
