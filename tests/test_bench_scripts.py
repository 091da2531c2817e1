"""The benchmark scripts' plumbing that only the GPU machine would otherwise exercise."""

import importlib.util
import os
import sys
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


def test_scale_files_repeat_the_source_with_a_suffix_per_copy(monkeypatch, tmp_path):
    bench = load_script("bench_scale", monkeypatch)
    source = tmp_path / "source.tsv"
    source.write_text("sentence_0\tsentence_1\tlabel\na dog\ta cat\t1.0\nrain\tsun\t0.0\n")
    built = bench.build_pairs(source, 5, tmp_path / "five.tsv")
    assert built.read_text().splitlines()[1:] == ["a dog\ta cat\t1.0", "rain\tsun\t0.0", "a dog (1)\ta cat (1)\t1.0",
                                                   "rain (1)\tsun (1)\t0.0", "a dog (2)\ta cat (2)\t1.0"]


def test_scale_measures_the_command_not_the_process_that_starts_it(monkeypatch):
    import numpy as np

    bench = load_script("bench_scale", monkeypatch)
    ballast = np.ones(1200 * 2**20, dtype=np.uint8)  # this process's own peak must not count in the command's
    grow = "import sys; block = bytearray(300 * 2**20); print('RESULT' + str(len(block)))"
    seconds, peak_gib, out = bench.run_measured([sys.executable, "-c", grow], dict(os.environ))
    assert out.strip() == f"RESULT{300 * 2**20}" and 0.29 < peak_gib < 1.0 and seconds > 0
    assert ballast.sum() == ballast.size
