"""Resume: stopping mid-epoch and continuing from last.ckpt ends with the same weights and metrics as an
uninterrupted run (CPU, same seed), at the same step and in the same data order."""

import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from minilm_sts.data.batching import PairBatches
from minilm_sts.model.checkpoint import LEGACY_RECORD_KEY, read_run_record
from minilm_sts.training.callbacks.run_record import RunRecord

from helpers import TESTS, attached, rewrite_in_the_previous_format, run


class Crash(Exception):
    pass


class CrashAtStep(L.Callback):
    """Dies at the end of a step, before that step's checkpoint is written (Lightning runs checkpoint
    callbacks last), like a process killed between two saves."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash


def test_resume_mid_epoch_equals_uninterrupted(tiny_model_dir, pair_files, tmp_path):
    full, full_trainer = run(tiny_model_dir, pair_files, tmp_path / "full")
    assert full_trainer.global_step == 10  # 40 pairs, batch 8, 2 epochs

    with pytest.raises(Crash):  # dies at step 8, in epoch 2, after last.ckpt was written at step 7
        run(tiny_model_dir, pair_files, tmp_path / "part", callbacks=[CrashAtStep(8)])
    assert torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["global_step"] == 7
    resumed, resumed_trainer = run(tiny_model_dir, pair_files, tmp_path / "part",
                                   ckpt_path=tmp_path / "part" / "last.ckpt")
    assert_same_run(full, full_trainer, resumed, resumed_trainer)


@pytest.mark.slow
def test_a_guarded_run_resumes_without_validating_before_training_again(tiny_model_dir, pair_files, tmp_path):
    """The validation before the first step belongs to the fresh run: a resumed one keeps its numbers from the
    checkpoint and ends as the uninterrupted run does."""
    full, full_trainer = run(tiny_model_dir, pair_files, tmp_path / "full", forgetting_guard=True)
    with pytest.raises(Crash):
        run(tiny_model_dir, pair_files, tmp_path / "part", callbacks=[CrashAtStep(8)], forgetting_guard=True)
    before = attached(full_trainer, RunRecord).record["before_training"]
    assert read_run_record(torch.load(tmp_path / "part" / "last.ckpt", weights_only=True))["before_training"] == before
    validations = []
    resumed, resumed_trainer = run(tiny_model_dir, pair_files, tmp_path / "part",
                                   ckpt_path=tmp_path / "part" / "last.ckpt",
                                   callbacks=[StepsValidated(validations)], forgetting_guard=True)
    assert validations == [9]  # none at step 7, where it resumed: only the run's own, every 3 steps
    assert attached(resumed_trainer, RunRecord).record["before_training"] == before
    assert_same_run(full, full_trainer, resumed, resumed_trainer)


class StepsValidated(L.Callback):
    def __init__(self, steps: list):
        self.steps = steps

    def on_validation_end(self, trainer, *args) -> None:
        self.steps.append(trainer.global_step)


def assert_same_run(full, full_trainer, resumed, resumed_trainer) -> None:
    assert resumed_trainer.global_step == 10
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    full_log = attached(full_trainer, RunRecord).record["log"]
    resumed_log = attached(resumed_trainer, RunRecord).record["log"]
    assert [r["step"] for r in resumed_log] == [r["step"] for r in full_log] == [3, 6, 9]
    for a, b in zip(full_log, resumed_log):
        assert abs(a["spearman_cosine"] - b["spearman_cosine"]) <= 1e-6
        assert abs(a["training_loss"] - b["training_loss"]) <= 1e-6


def test_a_checkpoint_of_the_previous_format_resumes_to_the_uninterrupted_result(tiny_model_dir, pair_files, tmp_path):
    full, full_trainer = run(tiny_model_dir, pair_files, tmp_path / "full")
    with pytest.raises(Crash):
        run(tiny_model_dir, pair_files, tmp_path / "part", callbacks=[CrashAtStep(8)])
    last = tmp_path / "part" / "last.ckpt"
    rewrite_in_the_previous_format(last)
    previous = torch.load(last, weights_only=True)
    assert not any("RunRecord" in key or "RandomStream" in key for key in previous["callbacks"])
    assert read_run_record(previous)["evaluation"] == {"val": {"val": {
        name: value for name, value in previous[LEGACY_RECORD_KEY]["log"][-1].items() if name.endswith("_cosine")}}}
    resumed, resumed_trainer = run(tiny_model_dir, pair_files, tmp_path / "part", ckpt_path=last)
    assert_same_run(full, full_trainer, resumed, resumed_trainer)


def test_batch_order_depends_on_seed_and_epoch_and_skips_on_resume():
    batches = PairBatches([10], 3, seed=42, mode="round_robin", batches_done=lambda: 2)
    epoch0 = list(batches)
    assert len(batches) == len(epoch0) == 4 and sorted(i for b in epoch0 for i in b) == list(range(10))
    batches.sampler.set_epoch(1)  # where Lightning calls it
    epoch1 = list(batches)
    assert epoch1 != epoch0
    state = batches.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}
    again = PairBatches([10], 3, seed=42, mode="round_robin", batches_done=lambda: 0)
    again.load_state_dict(state)
    again.set_epoch(1)
    assert list(again) == epoch1[2:]
    assert list(again) == epoch1  # only the first pass after a resume skips


def test_round_robin_alternates_and_stops_with_the_smallest_dataset():
    batches = PairBatches([10, 4, 7], 2, seed=0, mode="round_robin", batches_done=lambda: 0)
    plan = list(batches)
    owner = [0 if b[0] < 10 else 1 if b[0] < 14 else 2 for b in plan]
    assert owner == [0, 1, 2, 0, 1, 2] and len(batches) == 6  # the 4-pair set has 2 batches
    assert all(len({0 if i < 10 else 1 if i < 14 else 2 for i in b}) == 1 for b in plan)  # one dataset per batch


def test_proportional_visits_every_batch_of_every_dataset():
    batches = PairBatches([10, 4, 7], 2, seed=0, mode="proportional", batches_done=lambda: 0)
    plan = list(batches)
    assert len(plan) == len(batches) == 5 + 2 + 4
    assert sorted(i for b in plan for i in b) == list(range(21))
    assert plan == list(PairBatches([10, 4, 7], 2, seed=0, mode="proportional", batches_done=lambda: 0))


KILL_AFTER_FIRST_VALIDATION = """
import os, signal
import lightning as L
from minilm_sts.cli import lightning_cli, main

class KillAfterFirstValidation(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 2:  # step 2 has trained and validated; nothing of step 3 has run
            os.kill(os.getpid(), signal.SIGKILL)

lightning_cli.TRAINER_DEFAULTS["callbacks"].append(KillAfterFirstValidation())
main()
"""


@pytest.mark.slow  # three fit processes: about 25 s on 2 CPU cores
def test_cli_killed_after_its_first_validation_resumes_from_last_to_the_uninterrupted_result(
        tiny_model_dir, pair_files, tmp_path):
    """A real `fit` process, killed (SIGKILL) right after its first validation, leaves a last.ckpt holding that
    validation; `fit --ckpt_path last` then ends with the weights and metrics of a run never interrupted."""
    args = ["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(pair_files["train"]),
            "--data.val_path", str(pair_files["val"]), "--data.batch_size", "8", "--model.lr", "1e-3",
            "--trainer.max_epochs", "2", "--trainer.val_check_interval", "2", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--data.forgetting_guard", "false"]
    (tmp_path / "full").mkdir(), (tmp_path / "part").mkdir()
    full = subprocess.Popen([sys.executable, "-m", "minilm_sts", *args], cwd=tmp_path / "full", stderr=subprocess.PIPE,
                            text=True)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_VALIDATION, *args], cwd=tmp_path / "part",
                            capture_output=True, text=True)
    assert full.wait() == 0, full.stderr.read()[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    last = tmp_path / "part" / "runs" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2 and [row["step"] for row in read_run_record(saved)["log"]] == [2]
    resumed = subprocess.run([sys.executable, "-m", "minilm_sts", *args, "--ckpt_path", "last"], cwd=tmp_path / "part",
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = torch.load(tmp_path / "full" / "runs" / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(last, weights_only=True)
    assert got["global_step"] == expected["global_step"] == 10
    expected_log, got_log = read_run_record(expected)["log"], read_run_record(got)["log"]
    assert [row["step"] for row in got_log] == [row["step"] for row in expected_log] == [2, 4, 6, 8, 10]
    for a, b in zip(expected_log, got_log):
        assert a["spearman_cosine"] == pytest.approx(b["spearman_cosine"], abs=1e-6)
        assert a["training_loss"] == pytest.approx(b["training_loss"], abs=1e-6)
    for name, tensor in expected["state_dict"].items():
        assert torch.allclose(tensor, got["state_dict"][name], atol=1e-6), name


KILLED_RUN = """
import os, signal, sys
import lightning as L
sys.path.insert(0, {tests!r})
from helpers import attached, rewrite_in_the_previous_format, run

class SigkillAtStep(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 8:  # after last.ckpt of step 7, before step 8's is written
            os.kill(os.getpid(), signal.SIGKILL)

pair_files = {{"train": {train!r}, "val": {val!r}}}
run({model!r}, pair_files, {root!r}, callbacks=[SigkillAtStep()])
"""


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_model_dir, pair_files, tmp_path):
    full, full_trainer = run(tiny_model_dir, pair_files, tmp_path / "full")
    script = KILLED_RUN.format(tests=str(TESTS), train=str(pair_files["train"]),
                               val=str(pair_files["val"]), model=str(tiny_model_dir), root=str(tmp_path / "part"))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert not list((tmp_path / "part").glob("*.tmp*"))  # no half-written file left beside it
    resumed, trainer = run(tiny_model_dir, pair_files, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt")
    assert trainer.global_step == 10
    assert [r["spearman_cosine"] for r in attached(trainer, RunRecord).record["log"]] == pytest.approx(
        [r["spearman_cosine"] for r in attached(full_trainer, RunRecord).record["log"]], abs=1e-6)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
