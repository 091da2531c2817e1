"""The command line: recipes resolve, fit runs end to end (twice in one folder), and never imports the oracle."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    assert default["checkpoint"]["monitor"] == "val/spearman_cosine" and default["checkpoint"]["save_last"] is True


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
cli = main(sys.argv[1:])
assert "sentence_transformers" not in sys.modules, "minilm_sts imported the reference"
print("PRECISION", cli.trainer.precision)
"""


def test_fit_runs_twice_in_one_folder_and_never_imports_sentence_transformers(tiny_model_dir, pair_files, tmp_path):
    args = ["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
            "--data.val_path", str(pair_files["val"]), "--data.batch_size", "8", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false"]
    for run in range(2):
        result = subprocess.run([sys.executable, "-c", FIT_SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "PRECISION 32-true" in result.stdout
        version = tmp_path / "runs" / "lightning_logs" / f"version_{run}"
        checkpoints = sorted(p.name for p in (version / "checkpoints").iterdir())
        assert "last.ckpt" in checkpoints and any(name.startswith("step") for name in checkpoints)
        header = (version / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"train/loss", "val/pearson_cosine", "val/spearman_cosine"} <= set(header)


def test_bad_data_fails_before_training(tiny_model_dir, pair_files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence_0\tsentence_1\tlabel\na dog\ta cat\t0.5\na dog\ta cat\tabc\n")
    result = cli("fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(bad),
                 "--data.val_path", str(pair_files["val"]), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"{bad}, line 3, column 'label': expected a finite number, got 'abc'" in result.stderr
    assert "Epoch 0" not in result.stdout + result.stderr
