"""A plain (non-editable) `pip install` of the package, used from another folder with nothing beside it: the
packaged recipes are found by name, and the duplicates recipe trains on a user's file."""

import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, write_tsv

FIT = """
import sys
import minilm_sts
from minilm_sts.cli import main
assert minilm_sts.__file__.startswith(sys.argv[1]), minilm_sts.__file__  # the installed copy, not the checkout
sys.argv[1:] = sys.argv[2:]
main()
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed into a folder of its own (with no dependencies: those are this environment's)."""
    source, target = tmp_path_factory.mktemp("source") / "minilm_sts", tmp_path_factory.mktemp("site")
    # A copy of what a clone holds, so that the build's own folders stay out of the checkout.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__"))
    # The build gets an isolated environment, as a user's pip install does, so setuptools sees none of the plugins
    # (entry points) that this environment's packages register: one of them broke the build under .ci/lowest.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(source)], check=True, capture_output=True, text=True)
    return target


@pytest.mark.slow
def test_the_duplicates_recipe_trains_by_name_from_an_installed_copy(installed, tiny_model_dir, tmp_path):
    assert (installed / "minilm_sts" / "cli" / "recipes" / "duplicates.yaml").is_file()
    rows = [[f"a {i} man plays", f"the {i} dog runs", float(i % 2)] for i in range(24)]
    train, dev = write_tsv(tmp_path / "train.tsv", rows), write_tsv(tmp_path / "dev.tsv", rows[:8])
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", FIT, str(installed), "fit", "--config", "duplicates",
         "--model.pretrained", str(tiny_model_dir),
         "--data.train_path", f"{{duplicates: {train}, stsb: builtin:stsb/train}}",
         "--data.val_path", f"{{duplicates: {dev}, stsb: builtin:stsb/dev}}", "--trainer.max_steps", "2",
         "--trainer.logger", "false", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false"],
        cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin",
                                                       "HOME": str(tmp_path), "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(work.rglob("step2-mrr@10=*.ckpt"))) == 1 and list(work.rglob("last.ckpt"))


def test_a_recipe_name_that_is_neither_a_file_nor_packaged_is_one_error_line(tmp_path):
    from helpers import cli

    result = cli("fit", "--config", "duplicats", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --config duplicats: no such file, and no packaged recipe")
    assert "duplicates, duplicates_mined, stackexchange, stackexchange_fit, stsb" in result.stderr


def test_every_recipe_in_configs_is_the_packaged_one():
    packaged = ROOT / "minilm_sts" / "cli" / "recipes"
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert [path.name for path in configs] == sorted(path.name for path in packaged.glob("*.yaml"))
    assert all(path.resolve() == (packaged / path.name).resolve() for path in configs)
