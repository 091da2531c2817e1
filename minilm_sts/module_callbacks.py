"""The callbacks every SentenceEmbedder brings to its trainer (`configure_callbacks`), so a fit from the command
line or from plain Lightning has them all:

* `SplitEvaluation` scores validation and test splits whole and logs their metrics;
* `RunRecord` keeps what the model card states about the run;
* `ValidateBeforeTraining` validates the base model once before the first step when the forgetting guard is on;
* `RandomStreamOnResume` continues the random stream where a checkpoint left it;
* `NonFiniteLossCheckpoint` saves the state when the loss turns NaN or infinite (`NonFiniteLoss`);
* `SkippedStepCounter` counts the optimizer steps that fp16 loss scaling skipped.

The record and the random stream are kept in checkpoints through their `state_dict`, in plain values so that
checkpoints load with `torch.load(weights_only=True)`. Checkpoints written before these callbacks existed hold
them under the top-level keys `minilm_sts_run` and `minilm_sts_resume`; those are read too.
(`callbacks.py` holds the callbacks that the command-line recipes add.)
"""

from __future__ import annotations

import platform
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities.seed import isolate_rng

from minilm_sts.compat import epoch_batch_index, step_loss, validate_within_fit
from minilm_sts.datamodule import PairDataModule
from minilm_sts.evaluation import PairScores, ScoredSet
from minilm_sts.hardware import machine
from minilm_sts.run_folder import save_emergency_checkpoint
from minilm_sts.version import __version__

LEGACY_RECORD_KEY = "minilm_sts_run"
LEGACY_RESUME_KEY = "minilm_sts_resume"


class ModuleCallback(L.Callback):
    """A callback that SentenceEmbedder attaches itself; `of(trainer)` finds it."""

    @classmethod
    def of(cls, trainer: L.Trainer):
        """The trainer's instance of this callback."""
        return next(c for c in trainer.callbacks if isinstance(c, cls))


class SplitEvaluation(ModuleCallback):
    """Scores each evaluation split whole, from the per-pair cosines that `validation_step` / `test_step` return.

    Each evaluation set (dataloader) accumulates into its own `PairScores`. At the end of the split, every set's
    metrics are logged as `<stage>/<set>/<metric>` when there are several sets, and the first (monitored) set's
    also as `<stage>/<metric>`. The buffers are emptied every time, also after the sanity check, so its batches
    never leak into the first real validation. `latest[stage]` holds each set's `ScoredSet`, first set first.
    """

    def __init__(self):
        self._scores: dict[tuple[str, int], PairScores] = {}
        self.latest: dict[str, dict[str, ScoredSet]] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", dataloader_idx, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", dataloader_idx, outputs, batch)

    def _update(self, stage: str, index: int, cosine: torch.Tensor, batch: dict) -> None:
        self._scores.setdefault((stage, index), PairScores()).update(cosine, batch["labels"], batch["indices"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_split(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_split(trainer, pl_module, "test")

    def _log_split(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        indices = sorted(index for s, index in self._scores if s == stage)
        if not indices:  # no batch was scored
            return
        names = _set_names(trainer, stage, len(indices))
        self.latest[stage] = {name: _with_retrieval(trainer, pl_module, stage, name, self._scores.pop((stage, index)).compute())
                              for name, index in zip(names, indices)}
        logged = {f"{stage}/{metric}": value for metric, value in next(iter(self.latest[stage].values())).metrics.items()}
        if len(names) > 1:
            logged.update({f"{stage}/{name}/{metric}": value
                           for name, scored in self.latest[stage].items() for metric, value in scored.metrics.items()})
        pl_module.log_dict(logged, prog_bar=len(names) == 1, add_dataloader_idx=False)


RETRIEVAL_PROGRESS_FROM = 20_000  # corpus sentences: from here on, embedding the corpus shows a progress bar


def _with_retrieval(trainer: L.Trainer, pl_module: L.LightningModule, stage: str, name: str,
                    scored: ScoredSet) -> ScoredSet:
    """The set's scores plus its duplicate-retrieval metrics when the data module has a retrieval task for it.

    Every process embeds the whole corpus the same way and so computes the same metrics: no gathering, and a
    distributed run reports what a single process would. The sanity check skips it (two batches say nothing)."""
    data = trainer.datamodule
    task = data.retrieval_task(stage, name) if isinstance(data, PairDataModule) else None
    if task is None or trainer.sanity_checking:
        return scored
    show_progress = trainer.is_global_zero and len(task.corpus) >= RETRIEVAL_PROGRESS_FROM
    with trainer.precision_plugin.forward_context():  # the precision the validation steps ran in
        retrieval = task.evaluate(lambda sentences: pl_module.encode(sentences, device=pl_module.device,
                                                                     show_progress=show_progress))
    return scored._replace(metrics={**scored.metrics, **retrieval})


def _set_names(trainer: L.Trainer, stage: str, count: int) -> list[str]:
    """The evaluation sets' names in dataloader order: PairDataModule's, or the dataloader index otherwise."""
    if isinstance(trainer.datamodule, PairDataModule):
        return trainer.datamodule.eval_names(stage)
    return [stage] if count == 1 else [f"dataloader_{i}" for i in range(count)]


class ValidateBeforeTraining(ModuleCallback):
    """When PairDataModule's forgetting guard is on, validates every set once as a fresh fit starts, before the
    first step, so the base model's scores are logged at step 0 and the run shows them beside the trained ones
    (`RunRecord` keeps them as `before_training`). The pass leaves the random stream as it found it, so training
    is the same with or without it; a resumed fit does not repeat it."""

    def __init__(self):
        self.running = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        if not isinstance(data, PairDataModule) or data.guard is None or trainer.ckpt_path or trainer.global_step:
            return
        self.running = True
        try:
            with isolate_rng():  # a loader without its own generator would draw its seed from the global stream
                validate_within_fit(trainer)
        finally:
            self.running = False


class RunRecord(ModuleCallback):
    """What the model card states about a run, in plain values: the datasets (size, token and label statistics,
    sample rows), the data and trainer settings (the precision that really ran), the machine (`hardware.machine`),
    the checkpoint monitor, framework versions, a row per validation (epoch, step, mean training loss since the previous validation, the monitored set's metrics),
    every evaluation set's latest metrics (`evaluation[stage][set]`) and, when the base model was validated
    before training, every set's metrics then (`before_training[set]`)."""

    def __init__(self):
        self.record: dict = {"datasets": {}, "log": [], "evaluation": {}}
        self._losses: list[torch.Tensor] = []  # each training batch's loss since the last validation

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, PairDataModule):
            self.record["datasets"] = {split: trainer.datamodule.describe(split) for split in ("train", "val")}
            self.record["data"] = dict(trainer.datamodule.hparams)
        self.record["trainer"] = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                                  "precision": trainer.precision, "val_check_interval": trainer.val_check_interval,
                                  "accumulate_grad_batches": trainer.accumulate_grad_batches}
        monitor = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        if monitor is not None:
            self.record["monitor"] = {"key": monitor.monitor, "mode": monitor.mode}
        self.record["versions"] = framework_versions()
        self.record["machine"] = machine()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._losses.append(step_loss(trainer, outputs))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sets = SplitEvaluation.of(trainer).latest.get("val")
        if trainer.sanity_checking or trainer.state.fn != "fit" or not sets:
            return
        if ValidateBeforeTraining.of(trainer).running:
            self.record["before_training"] = {name: scored.metrics for name, scored in sets.items()}
            return
        losses, self._losses = self._losses, []
        epoch = trainer.current_epoch + (epoch_batch_index(trainer) + 1) / max(1, trainer.num_training_batches)
        self.record["log"].append({"epoch": round(epoch, 4), "step": trainer.global_step,
                                   "training_loss": torch.stack([x.cpu() for x in losses]).mean().item() if losses else None,
                                   **next(iter(sets.values())).metrics})
        self.record["evaluation"]["val"] = {name: scored.metrics for name, scored in sets.items()}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sets = SplitEvaluation.of(trainer).latest.get("test", {})
        self.record["evaluation"]["test"] = {name: scored.metrics for name, scored in sets.items()}

    def state_dict(self) -> dict:
        return {"record": self.record, "loss_since_validation": [loss.item() for loss in self._losses]}

    def load_state_dict(self, state: dict) -> None:
        self.record = state["record"]
        self._losses = [torch.tensor(loss) for loss in state["loss_since_validation"]]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if LEGACY_RECORD_KEY in checkpoint:  # an older checkpoint; a newer one goes through load_state_dict
            self.record = read_run_record(checkpoint)
            losses = checkpoint.get(LEGACY_RESUME_KEY, {}).get("loss_since_validation", [])
            self._losses = [torch.tensor(loss) for loss in losses]


def read_run_record(checkpoint: dict) -> dict:
    """The run record a checkpoint holds (written by RunRecord, or by an older minilm_sts), or an empty one."""
    state = checkpoint.get("callbacks", {}).get(RunRecord().state_key)
    if state is not None:
        return state["record"]
    legacy = checkpoint.get(LEGACY_RECORD_KEY)
    return RunRecord().record if legacy is None else _upgraded(legacy)


def _upgraded(legacy: dict) -> dict:
    """An older record in today's form: it kept the (one) validation set's latest metrics only in the last log
    row, and the test's under "test"."""
    record = {key: value for key, value in legacy.items() if key != "test"}
    record["evaluation"] = {}
    if legacy.get("log"):
        last = legacy["log"][-1]
        record["evaluation"]["val"] = {"val": {key: value for key, value in last.items()
                                               if key not in ("epoch", "step", "training_loss")}}
    if legacy.get("test"):
        record["evaluation"]["test"] = {"test": legacy["test"]}
    return record


def framework_versions() -> dict[str, str]:
    import tokenizers
    import transformers

    versions = {"Python": platform.python_version(), "minilm_sts": __version__, "Lightning": L.__version__,
                "Transformers": transformers.__version__, "PyTorch": torch.__version__, "Tokenizers": tokenizers.__version__}
    return {name: str(version) for name, version in versions.items()}  # plain str: checkpoints load weights_only


class RandomStreamOnResume(ModuleCallback):
    """Saves the random state (torch's CPU and CUDA generators, which dropout draws from) in every checkpoint
    and, when a fit resumes from one, restores it as training starts, so a resumed run ends with the same
    weights as an uninterrupted one."""

    def __init__(self):
        self._restore: Optional[dict] = None

    def state_dict(self) -> dict:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": states}

    def load_state_dict(self, state: dict) -> None:
        self._restore = state["rng"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if LEGACY_RESUME_KEY in checkpoint:  # an older checkpoint; a newer one goes through load_state_dict
            self._restore = checkpoint[LEGACY_RESUME_KEY]["rng"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restore is None:
            return
        torch.set_rng_state(self._restore["cpu"])
        if "cuda" in self._restore and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._restore["cuda"])
        self._restore = None


class NonFiniteLoss(FloatingPointError):
    """The training loss is NaN or infinite: the run stops instead of training on garbage. It names the step,
    epoch and batch, and the checkpoint that `NonFiniteLossCheckpoint` saved, once it has."""

    def __init__(self, loss: float, step: int, epoch: int, batch_idx: int):
        super().__init__(loss, step, epoch, batch_idx)
        self.loss, self.step, self.epoch, self.batch_idx = loss, step, epoch, batch_idx
        self.checkpoint = None

    def __str__(self) -> str:
        saved = f" The weights before this step are saved in {self.checkpoint}." if self.checkpoint else ""
        return (f"the training loss is {self.loss} at step {self.step} (epoch {self.epoch}, batch {self.batch_idx}); "
                f"the run stops here.{saved} Under fp16, try bf16-mixed or 32-true, or a lower learning rate.")


class NonFiniteLossCheckpoint(ModuleCallback):
    """When training stops on a `NonFiniteLoss`, saves the state (the weights from before that step) as
    `non-finite-loss-step<N>.ckpt` beside the regular checkpoints, and names it in the error."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLoss):
            exception.checkpoint = save_emergency_checkpoint(trainer, f"non-finite-loss-step{exception.step}.ckpt")


class SkippedStepCounter(ModuleCallback):
    """Under fp16 loss scaling, GradScaler skips an optimizer step whose gradients hold inf or NaN and lowers its
    scale: counts those steps (`skipped`, in this process) and logs the count as `train/skipped_steps`."""

    def __init__(self):
        self.skipped = 0
        self._scale_before_step: Optional[float] = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scale_before_step = scaler.get_scale() if scaler is not None else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._scale_before_step is None:
            return
        if trainer.precision_plugin.scaler.get_scale() < self._scale_before_step:
            self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
