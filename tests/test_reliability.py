"""Reliability: preemption, divergence, fp16 skipped steps, determinism."""

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from minilm_sts.callbacks import SaveOnTerminate
from minilm_sts.datamodule import PairDataModule
from minilm_sts.module import SentenceEmbedder
from minilm_sts.pairs import PairDataError, read_pairs

from test_resume import run


class SigtermAtStep(L.Callback):
    """A real SIGTERM to this process at a given step; Lightning's handler stops after the current batch."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_and_resume_matches(tiny_model_dir, pair_files, tmp_path):
    full, _ = run(tiny_model_dir, pair_files, tmp_path / "full")
    with pytest.raises(SIGTERMException):
        run(tiny_model_dir, pair_files, tmp_path / "part", callbacks=[SigtermAtStep(8), SaveOnTerminate()],
            checkpoint_every=100)
    saved = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 8  # saved on the way out, not at a periodic checkpoint
    resumed, trainer = run(tiny_model_dir, pair_files, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert trainer.global_step == 10
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_non_finite_loss_stops_with_step_batch_and_checkpoint(tiny_model_dir, pair_files, tmp_path):
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    with torch.no_grad():
        model.embedder.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)
    trainer = L.Trainer(max_steps=3, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_checkpointing=False)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 \(epoch 0, batch 0\)") as err:
        trainer.fit(model, data)
    assert (tmp_path / "non-finite-loss-step0.ckpt").is_file() and "non-finite-loss-step0.ckpt" in str(err.value)


def test_fp16_skipped_steps_are_counted(tiny_model_dir, pair_files, tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 gradients at first
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(model, data)
    assert model.skipped_steps >= 1
    assert trainer.callback_metrics["train/skipped_steps"] == model.skipped_steps
    assert scaler.get_scale() < 2.0**40


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_metrics_with_or_without_workers(tiny_model_dir, pair_files, tmp_path, workers):
    def fit(num_workers):
        L.seed_everything(42)
        model = SentenceEmbedder(pretrained=str(tiny_model_dir), lr=1e-3)
        data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, num_workers=num_workers)
        trainer = L.Trainer(max_epochs=2, val_check_interval=5, check_val_every_n_epoch=None, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
        trainer.fit(model, data)
        return model

    reference, other = fit(0), fit(workers)
    assert [r["spearman_cosine"] for r in reference.run_record["log"]] == pytest.approx(
        [r["spearman_cosine"] for r in other.run_record["log"]], abs=1e-6)
    for a, b in zip(reference.parameters(), other.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_text_file_quirks(tmp_path):
    (tmp_path / "bom_crlf.tsv").write_bytes("\ufeffsentence_0\tsentence_1\tlabel\r\na dog\ta cat\t0.5\r\nb\tc\t1\r\n".encode())
    table = read_pairs(str(tmp_path / "bom_crlf.tsv"))  # a BOM and CRLF line endings read cleanly
    assert table.sentences_a == ["a dog", "b"] and table.labels == [0.5, 1.0]
    (tmp_path / "quote.tsv").write_text('sentence_0\tsentence_1\tlabel\n"a dog\ta cat\t0.5\nb\tc\t1\n')
    with pytest.raises(PairDataError, match="quote.tsv"):  # an unclosed quote swallows the rest of the file
        read_pairs(str(tmp_path / "quote.tsv"))


def test_parquet_with_wrong_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence_0": [1, 2], "sentence_1": ["a", "b"], "label": [0.5, 0.1]}), tmp_path / "p.parquet")
    with pytest.raises(PairDataError, match=r"row 1, column 'sentence_0': expected a non-empty sentence, got 1"):
        read_pairs(str(tmp_path / "p.parquet"))
    pq.write_table(pa.table({"sentence_0": ["a"], "sentence_1": ["b"], "label": [None]}), tmp_path / "n.parquet")
    with pytest.raises(PairDataError, match="row 1, column 'label': expected a finite number, got None"):
        read_pairs(str(tmp_path / "n.parquet"))


KILLED_RUN = """
import os, signal, sys
import lightning as L
sys.path.insert(0, {tests!r})
from test_resume import run

class SigkillAtStep(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 8:  # after last.ckpt of step 7, before step 8's is written
            os.kill(os.getpid(), signal.SIGKILL)

pair_files = {{"train": {train!r}, "val": {val!r}}}
run({model!r}, pair_files, {root!r}, callbacks=[SigkillAtStep()])
"""


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_model_dir, pair_files, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    full, _ = run(tiny_model_dir, pair_files, tmp_path / "full")
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), train=str(pair_files["train"]), val=str(pair_files["val"]),
                               model=str(tiny_model_dir), root=str(tmp_path / "part"))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert not list((tmp_path / "part").glob("*.tmp*"))  # no half-written file left beside it
    resumed, trainer = run(tiny_model_dir, pair_files, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert trainer.global_step == 10
    assert [r["spearman_cosine"] for r in resumed.run_record["log"]] == pytest.approx(
        [r["spearman_cosine"] for r in full.run_record["log"]], abs=1e-6)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
