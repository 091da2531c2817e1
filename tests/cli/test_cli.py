"""The command line: recipes resolve, fit runs end to end (twice in one folder), and never imports the oracle."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minilm_sts.data.pairs import read_pairs
from minilm_sts.errors import UserInputError
from minilm_sts.model.checkpoint import read_run_record

from helpers import ROOT, cli, write_tsv
from wandb_records import run_content


def resolved(*args: str) -> dict:
    return yaml.safe_load(cli("fit", *args, "--print_config").stdout)


@pytest.mark.slow
def test_no_argument_default_is_the_stsb_recipe():
    default = resolved()
    assert default == resolved("--config", "configs/stsb.yaml")
    assert default["data"]["train_path"] == "builtin:stsb/train" and default["data"]["test_path"] == "builtin:stsb/test"
    assert default["model"]["lr"] == 5e-5 and default["data"]["batch_size"] == 32
    assert default["seed_everything"] == 42 and default["trainer"]["max_epochs"] == 1
    assert default["trainer"]["check_val_every_n_epoch"] is None
    assert default["checkpoint"]["monitor"] == "val/spearman_cosine" and default["checkpoint"]["save_last"] is False
    assert default["periodic_checkpoint"]["save_last"] is True  # the one writer of last.ckpt


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_duplicates_recipe_trains_each_set_with_its_loss_and_selects_on_retrieval():
    recipe = resolved("--config", "configs/duplicates.yaml")
    assert recipe["model"]["loss"] == {"duplicates": "mnrl", "stsb": "cosent"}
    assert set(recipe["data"]["train_path"]) == set(recipe["model"]["loss"])
    assert recipe["data"]["retrieval"] == ["duplicates"] and "duplicates" in recipe["data"]["val_path"]
    assert recipe["checkpoint"]["monitor"] == "val/cosine_mrr@10" and recipe["checkpoint"]["mode"] == "max"
    assert (recipe["model"]["lr"], recipe["model"]["warmup_steps"], recipe["trainer"]["max_steps"]) == (2e-5, 100, 2000)


@pytest.mark.slow
def test_the_duplicates_recipe_runs_as_the_readme_gives_it(tiny_model_dir, pair_files, tmp_path):
    graded = read_pairs(str(pair_files["train"]))
    binary = [[a, b, float(label >= 0.5)] for a, b, label in zip(graded.sentences_a, graded.sentences_b, graded.labels)]
    train, dev = write_tsv(tmp_path / "train.tsv", binary), write_tsv(tmp_path / "dev.tsv", binary[:16])
    result = cli("fit", "--config", str(ROOT / "configs/duplicates.yaml"), "--model.pretrained", str(tiny_model_dir),
                 "--data.train_path", f"{{duplicates: {train}, stsb: builtin:stsb/train}}",
                 "--data.val_path", f"{{duplicates: {dev}, stsb: builtin:stsb/dev}}", "--trainer.max_steps", "4",
                 "--trainer.val_check_interval", "2", "--trainer.logger", "false", "--trainer.precision", "32",
                 cwd=tmp_path)
    assert "rows labelled 0 left out" in result.stderr + result.stdout
    best = [path.name for path in tmp_path.rglob("step*-mrr@10=*.ckpt")]
    assert len(best) == 1, best
    record = read_run_record(torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True))
    assert {"cosine_mrr@10", "cosine_ap", "spearman_cosine"} <= set(record["evaluation"]["val"]["duplicates"])
    assert "spearman_cosine" in record["evaluation"]["val"]["stsb"]


@pytest.mark.slow
def test_unknown_config_key_is_rejected():
    result = cli("fit", "--model.learning_rate", "1e-4", "--print_config", check=False)
    assert result.returncode != 0 and "learning_rate" in result.stderr


FIT_SCRIPT = """
import sys
from minilm_sts.cli.commands import main
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
                "val/pearson_cosine", "val/spearman_cosine", "val/stsb/spearman_cosine",
                "trainer/global_step"} <= metrics
        assert any(key.startswith("val/cosine_vs_label") for key in metrics)
        output = result.stdout + result.stderr
        assert (f"W&B run (offline): upload it with "
                f"`wandb sync {run_files[-1].parent.relative_to(tmp_path)}`") in result.stdout
        for noise in ("anonymous setting", "LeafSpec", "💡 Tip", "Total FLOPs"):  # warnings nobody can act on
            assert noise not in output
    run_dirs = sorted(p for p in (tmp_path / "runs" / "minilm-sts").iterdir())
    assert len(run_dirs) == 2
    assert not (tmp_path / "runs" / "config.yaml").exists()  # each run's config lives in its own folder
    for run_dir in run_dirs:
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["lr"] == 1e-3
        names = {p.name for p in (run_dir / "checkpoints").iterdir()}
        assert "last.ckpt" in names and any(n.startswith("step") and n.endswith(".ckpt") for n in names)
        assert not [n for n in names if n.startswith("last-v")]  # one last.ckpt, not one per callback
        last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 5  # the run's final step (40 pairs in batches of 8), not the last 200th
        assert {"cosine_vs_label_step0.png", "cosine_vs_label_step2.png", "cosine_vs_label_step4.png"} <= names


@pytest.mark.slow
def test_logger_can_be_switched_off(tiny_model_dir, pair_files, tmp_path):
    cli("fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
        "--data.val_path", str(pair_files["val"]), "--trainer.max_steps", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.forgetting_guard", "false", cwd=tmp_path)
    assert not (tmp_path / "runs" / "wandb").exists()
    assert any((tmp_path / "runs").rglob("last.ckpt"))


@pytest.mark.slow
def test_bad_data_fails_before_training(tiny_model_dir, pair_files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence_0\tsentence_1\tlabel\na dog\ta cat\t0.5\na dog\ta cat\tabc\n")
    result = cli("fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(bad),
                 "--data.val_path", str(pair_files["val"]), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"{bad}, line 3, column 'label': expected a finite number, got 'abc'" in result.stderr
    assert "Epoch 0" not in result.stdout + result.stderr


def tiny_fit_args(tiny_model_dir, pair_files) -> list[str]:
    return ["--model.pretrained", str(tiny_model_dir), "--data.batch_size", "8",
            "--trainer.enable_progress_bar", "false", "--data.forgetting_guard", "false"]


def write_user_recipe(folder: Path, pair_files) -> Path:
    """What a user writes first: their two data files and nothing else."""
    recipe = folder / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train_path": str(pair_files["train"]),
                                               "val_path": str(pair_files["val"])}}))
    return recipe


@pytest.mark.slow
def test_a_user_recipe_gets_the_documented_defaults_and_no_inherited_data(pair_files, tmp_path):
    import inspect

    from minilm_sts import PairDataModule, SentenceEncoderTraining

    config = resolved("--config", str(write_user_recipe(tmp_path, pair_files)))
    assert config["data"]["train_path"] == str(pair_files["train"]) and config["data"]["test_path"] is None
    for section, cls in (("model", SentenceEncoderTraining), ("data", PairDataModule)):
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.default is not inspect.Parameter.empty and name not in ("train_path", "val_path"):
                assert config[section][name] == parameter.default, f"{section}.{name}"
    assert config["trainer"]["val_check_interval"] == 500 and config["trainer"]["max_epochs"] is None
    # naming a data set on the command line also leaves the STS-B recipe out
    assert resolved("--data.train_path", str(pair_files["train"]))["data"]["val_path"] is None


@pytest.mark.slow
def test_test_of_a_user_recipe_scores_no_set_it_did_not_name(tiny_model_dir, pair_files, tmp_path):
    result = cli("test", "--config", str(write_user_recipe(tmp_path, pair_files)), "--model.pretrained",
                 str(tiny_model_dir), "--trainer.logger", "false", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: no test data: set --data.test_path"


@pytest.mark.slow
def test_short_run_validates_at_its_end_and_the_summary_gives_the_next_commands(tiny_model_dir, pair_files, tmp_path):
    """7 steps with the default validation interval (500): the run still validates at step 7, keeps that
    checkpoint as the best, and the closing summary's test command runs as printed."""
    recipe = write_user_recipe(tmp_path, pair_files)
    result = cli("fit", "--config", str(recipe), *tiny_fit_args(tiny_model_dir, pair_files), "--trainer.max_steps", "7",
                 "--seed_everything", "7", cwd=tmp_path)
    assert ("Training stops after 7 steps (max_steps; an epoch is 5 steps); validation after the last step only "
            "(val_check_interval=500, the run has 7 steps)") in result.stdout + result.stderr
    run_dir = next((tmp_path / "runs" / "minilm-sts").iterdir())  # the default logger (W&B, disabled by conftest)
    best = next((run_dir / "checkpoints").glob("step*.ckpt"))
    assert best.name.startswith("step7-")
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["global_step"] == 7 and checkpoint["datamodule_hyper_parameters"]["seed"] == 7  # follows the seed
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7

    summary = result.stdout[result.stdout.index("Run folder:"):].splitlines()
    score = checkpoint["callbacks"][next(k for k in checkpoint["callbacks"]
                                         if "val/spearman_cosine" in k)]["best_model_score"]
    assert summary[0] == f"Run folder: {run_dir.relative_to(tmp_path)}"
    assert summary[1] == (f"Best checkpoint: {best.relative_to(tmp_path)} "
                          f"(val/spearman_cosine {float(score):.4f} at step 7)")
    assert summary[2] == f"Last checkpoint: {run_dir.relative_to(tmp_path) / 'checkpoints' / 'last.ckpt'}"
    test_command, export_command = summary[-2].split(), summary[-1].split()
    assert test_command[:9] == ["python", "-m", "minilm_sts", "test", "--config",
                                str(run_dir.relative_to(tmp_path) / "config.yaml"),
                                "--ckpt_path", str(best.relative_to(tmp_path)),
                                "--data.test_path"]  # this recipe names no test set
    assert export_command == ["python", "-m", "minilm_sts", "export", str(best.relative_to(tmp_path)),
                              str(run_dir.relative_to(tmp_path) / "model")]
    tested = cli(*test_command[3:9], str(pair_files["val"]), "--trainer.logger", "false", cwd=tmp_path)
    assert "test/spearman_cosine" in tested.stdout


def test_enable_checkpointing_false_trains_and_writes_no_checkpoint(tiny_model_dir, pair_files, tmp_path):
    result = cli("fit", "--config", str(write_user_recipe(tmp_path, pair_files)),
                 *tiny_fit_args(tiny_model_dir, pair_files),
                 "--trainer.enable_checkpointing", "false", "--trainer.logger", "false", cwd=tmp_path)
    assert "`Trainer.fit` stopped: `max_epochs=1` reached" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and "No checkpoints" in result.stdout
    assert (tmp_path / "runs" / "cosine_vs_label_step5.png").is_file()  # it validated at its end


def test_a_command_line_bound_replaces_the_recipes_other_bound():
    from types import SimpleNamespace

    from minilm_sts.cli.lightning_cli import settle_training_length

    def settle(max_steps, max_epochs, *command_line):
        trainer = SimpleNamespace(max_steps=max_steps, max_epochs=max_epochs)
        settle_training_length(trainer, list(command_line))
        return trainer.max_steps, trainer.max_epochs

    assert settle(-1, None) == (-1, 1)  # the default: one epoch
    assert settle(40, None) == (40, -1)  # max_steps alone: as many epochs as it takes
    assert settle(40, 1, "--trainer.max_steps", "40") == (40, -1)  # overrides the recipe's max_epochs
    assert settle(40, 1, "--trainer.max_steps=40") == (40, -1)
    assert settle(1000, 2, "--trainer.max_epochs", "2") == (-1, 2)  # overrides the recipe's max_steps
    assert settle(40, 1, "--trainer.max_steps", "40", "--trainer.max_epochs", "1") == (40, 1)  # both: first reached
    assert settle(40, 3) == (40, 3)  # both in one recipe: first reached


@pytest.mark.parametrize("option, value, message", [
    ("--data.batch_size", "0", "error: batch_size must be at least 1 pair, got 0"),
    ("--data.train_path", "{tmp}/missing.tsv", "missing.tsv"),
    ("--data.train_path", "{tmp}", "is a directory"),
    ("--model.pretrained", "{tmp}/no-model", "pretrained folder"),
    ("--ckpt_path", "last", "error: --ckpt_path last: no last.ckpt under"),
    ("--ckpt_path", "{tmp}/nope.ckpt", "nope.ckpt: no such checkpoint file"),
    ("--model.loss", "cosine", "error: unknown loss 'cosine'; choose one of: cosine_mse, cosent, angle, mnrl"),
    ("--model.loss_params", "{{scale: -1}}", "error: loss 'cosine_mse' has no parameter 'scale'; its parameters: none"),
    ("--data.retrieval", "[dev]",
     "error: retrieval names ['dev'], which are not evaluation sets; they are ['val', 'stsb']"),
    ("--data.retrieval", "[val]", "val.tsv: cannot score it as duplicate retrieval: no pair is labelled >= 1"),
])
def test_a_user_error_is_one_message_and_exit_status_2(tiny_model_dir, pair_files, tmp_path, monkeypatch, capsys,
                                                       option, value, message):
    from minilm_sts.cli.commands import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["minilm_sts"])  # as if the args were the command line
    args = ["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
            "--data.val_path", str(pair_files["val"]), "--trainer.logger", "false", option, value.format(tmp=tmp_path)]
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))
    # --debug: the exception itself
    with pytest.raises(UserInputError, match=re.escape(message.removeprefix("error: "))):
        main([*args, "--debug"])


@pytest.mark.slow
def test_a_user_error_prints_no_traceback_and_debug_shows_it(tmp_path, monkeypatch):
    from minilm_sts.cli.commands import main

    result = cli("fit", "--data.batch_size", "0", "--trainer.logger", "false", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: batch_size must be at least 1 pair, got 0"
    monkeypatch.setenv("MINILM_STS_DEBUG", "1")  # the exception itself, which Python prints with its traceback
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["minilm_sts"])
    with pytest.raises(UserInputError, match="batch_size must be at least 1 pair"):
        main(["fit", "--data.batch_size", "0", "--trainer.logger", "false"])


def test_data_seed_follows_seed_everything_unless_set():
    import lightning as L

    from minilm_sts import PairDataModule

    L.seed_everything(7)
    assert PairDataModule().hparams.seed == 7
    assert PairDataModule(seed=3).hparams.seed == 3


@pytest.mark.parametrize("command, message", [
    (["export", "{tmp}/missing.ckpt", "{tmp}/out"], "missing.ckpt: no such checkpoint file or model folder"),
    (["predict", "{tmp}/missing.ckpt", "{tmp}/in.txt", "--output", "{tmp}/out.npy"],
     "missing.ckpt: no such checkpoint file or model folder"),
    (["export", "{tmp_model}", "{tmp}"],
     "exists and is not empty; choose another folder, or replace it with --overwrite "
     "(overwrite=True in Python)"),
])
def test_other_commands_end_a_user_error_the_same_way(tiny_model_dir, tmp_path, capsys, command, message):
    from minilm_sts.cli.commands import main

    (tmp_path / "kept.txt").write_text("a file export must not replace")
    with pytest.raises(SystemExit) as exit:
        main([part.format(tmp=tmp_path, tmp_model=tiny_model_dir) for part in command])
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and error.startswith(f"error: {tmp_path}") and error.endswith(message)


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    import minilm_sts.cli.commands as cli

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run_command", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["fit"])


@pytest.mark.parametrize("monitor, expected", [
    ("val/spearman_cosine", "step7-spearman0.8412.ckpt"),
    ("val/cosine_ap", "step7-ap0.8412.ckpt"),
    ("val/quora/cosine_ap", "step7-quora-ap0.8412.ckpt"),  # a set's metric: one file, not a folder
    ("val/quora/cosine_mrr@10", "step7-quora-mrr@10=0.8412.ckpt"),
    ("val/my set/cosine_f1", "step7-my-set-f1=0.8412.ckpt"),
    ("val/a:b/cosine_f1", "step7-a-b-f1.ckpt"),  # a name Python's format cannot hold: no value in the name
])
def test_best_checkpoint_names_follow_the_monitored_metric(monitor, expected):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minilm_sts.cli.lightning_cli import checkpoint_filename

    checkpoint = ModelCheckpoint(filename=checkpoint_filename(monitor), auto_insert_metric_name=False)
    assert checkpoint.format_checkpoint_name({"step": torch.tensor(7), monitor: torch.tensor(0.84123)}) == expected


@pytest.mark.parametrize("loss, params", [("cosine_mse", "{}"), ("cosent", "{scale: 10.0}"), ("angle", "{}"),
                                          ("mnrl", "{symmetric: true}"), ("{train: mnrl}", "{train: {scale: 10.0}}")])
def test_each_loss_trains_from_the_command_line(tiny_model_dir, pair_files, tmp_path, monkeypatch, loss, params):
    from minilm_sts.cli.commands import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["minilm_sts"])
    main(["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
          "--data.val_path", str(pair_files["val"]), "--data.batch_size", "8", "--model.loss", loss,
          "--model.loss_params", params, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false"])
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    column = metrics[0].split(",").index("train/loss")
    losses = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert len(losses) == 3 and all(math.isfinite(value) and value > 0 for value in losses)
    saved = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["hyper_parameters"]
    assert saved["loss"] == yaml.safe_load(loss) and saved["loss_params"] == yaml.safe_load(params)
