"""Helpers that several test files share: where the fixture files are, writing a pair file, running the command
line, the small fit that the resume tests interrupt and continue, and checkpoints in the format minilm_sts
wrote before its run record and random stream were callbacks. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.model.checkpoint import LEGACY_RECORD_KEY, LEGACY_RESUME_KEY
from minilm_sts.training.callbacks.resume import RandomStreamOnResume
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

TESTS = Path(__file__).resolve().parent  # on sys.path for every test (pyproject: pythonpath)
ROOT = TESTS.parent
FIXTURES = ROOT / "tests" / "fixtures"


def attached(trainer: L.Trainer, callback_class: type) -> L.Callback:
    """The trainer's callback of this class (the module attaches its own), failing clearly when there is none."""
    found = [c for c in trainer.callbacks if isinstance(c, callback_class)]
    assert len(found) == 1, f"{len(found)} {callback_class.__name__} callbacks attached"
    return found[0]


def write_tsv(path: Path, rows: list[list], header=("sentence_0", "sentence_1", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def cli(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m minilm_sts ARGS` in a subprocess; a failure shows the end of its stderr."""
    result = subprocess.run([sys.executable, "-m", "minilm_sts", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def run(model_dir, pair_files, root, ckpt_path=None, callbacks=(), checkpoint_every=1, forgetting_guard=False):
    """Two epochs of 5 steps (40 pairs, batch 8) validating every 3 steps, `last.ckpt` every `checkpoint_every`
    steps in `root`: the run that resume tests interrupt and continue. Returns (model, trainer)."""
    L.seed_everything(42)
    model = SentenceEncoderTraining(pretrained=str(model_dir), lr=1e-3)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8,
                          forgetting_guard=forgetting_guard)
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=0, save_last=True, every_n_train_steps=checkpoint_every)
    trainer = L.Trainer(max_epochs=2, val_check_interval=3, check_val_every_n_epoch=None, logger=False,
                        callbacks=[*callbacks, checkpoint], enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def rewrite_in_the_previous_format(path: Path) -> None:
    """Rewrite a checkpoint as minilm_sts wrote it before its run record and random stream were callbacks with
    states of their own: both under top-level keys, the test's metrics in the record under "test"."""
    checkpoint = torch.load(path, weights_only=True)
    record = checkpoint["callbacks"].pop(RunRecord().state_key)
    random_stream = checkpoint["callbacks"].pop(RandomStreamOnResume().state_key)
    previous = {key: value for key, value in record["record"].items() if key not in ("evaluation", "monitor")}
    checkpoint[LEGACY_RECORD_KEY] = {**previous, "test": {}}
    checkpoint[LEGACY_RESUME_KEY] = {"rng": random_stream["rng"],
                                     "loss_since_validation": record["loss_since_validation"]}
    torch.save(checkpoint, path)


def duplicates_file(path, rows=60, distinct=25, seed=0):
    """Pairs over a small pool of sentences, so that many share one; every third row labelled 0, others graded."""
    rng = random.Random(seed)
    pool = [f"the man plays {' '.join(rng.choices(['dog', 'cat', 'guitar', 'with', 'a'], k=4))} {i}"
            for i in range(distinct)]
    table = [[pool[rng.randrange(distinct)], pool[rng.randrange(distinct)],
              0.0 if i % 3 == 0 else round(rng.uniform(0.1, 1), 2)]
             for i in range(rows)]
    return write_tsv(path, table), table
