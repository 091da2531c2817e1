"""The benchmark scripts' plumbing that only the GPU machine would otherwise exercise."""

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as running the script puts its own folder first
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_processes_import_this_tree_first_and_keep_the_carried_path(monkeypatch, tmp_path):
    # On the GPU machine the CLI's jsonargparse and the Trainer's datasets come from wheels on PYTHONPATH.
    bench = load_script("bench_end_to_end", monkeypatch)
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert bench.child_env(4, tmp_path)["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site"]
    monkeypatch.delenv("PYTHONPATH")
    env = bench.child_env(4, tmp_path)
    assert env["PYTHONPATH"] == str(ROOT) and env["OMP_NUM_THREADS"] == "4"


def test_the_score_is_read_from_a_checkpoint_name_lightning_versioned(monkeypatch):
    bench = load_script("bench_end_to_end", monkeypatch)
    assert bench.spearman_in_name(Path("step450-spearman0.8659-v1.ckpt")) == 0.8659
    assert bench.spearman_in_name(Path("step50-spearman0.8012.ckpt")) == 0.8012
