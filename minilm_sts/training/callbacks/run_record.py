"""RunRecord: what the model card states about a run, kept in every checkpoint."""

from __future__ import annotations

import inspect
import platform

import lightning as L
import torch

from minilm_sts._compat import epoch_batch_index, step_loss
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.hardware import machine
from minilm_sts.model.checkpoint import LEGACY_RECORD_KEY, LEGACY_RESUME_KEY, empty_run_record, read_run_record
from minilm_sts.version import __version__


class RunRecord(L.Callback):
    """What the model card states about a run, in plain values: the datasets (size, token and label statistics,
    sample rows), the data and trainer settings (the precision that really ran), the default of every module and
    data setting (so the card can tell which were changed), the machine (`hardware.machine`), the checkpoint
    monitor, framework versions, a row per validation (epoch, step, mean training loss since the previous
    validation, the monitored set's metrics), every evaluation set's latest metrics (`evaluation[stage][set]`),
    when the base model was validated before training, every set's metrics then (`before_training[set]`) and,
    when the run merged its weights with the base, the merge (`merge`, see MergeWithBase).

    It reads each validation's scores from the module's `latest_evaluation`, which SplitEvaluation fills. Kept in
    checkpoints through `state_dict`; checkpoints written before it was a callback hold it under a top-level key
    (`model.checkpoint.read_run_record` reads both)."""

    def __init__(self):
        self.record: dict = empty_run_record()
        self._losses: list[torch.Tensor] = []  # each training batch's loss since the last validation

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, PairDataModule):
            self.record["datasets"] = {split: trainer.datamodule.describe(split) for split in ("train", "val")}
            self.record["data"] = dict(trainer.datamodule.hparams)
        self.record["defaults"] = {**constructor_defaults(type(pl_module)),
                                   **constructor_defaults(type(trainer.datamodule))}
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
        sets = pl_module.latest_evaluation.get("val")
        if trainer.sanity_checking or trainer.state.fn != "fit" or not sets:
            return
        if trainer.global_step == 0:  # only ValidateBeforeTraining validates a fit before its first step
            self.record["before_training"] = {name: scored.metrics for name, scored in sets.items()}
            return
        losses, self._losses = self._losses, []
        epoch = trainer.current_epoch + (epoch_batch_index(trainer) + 1) / max(1, trainer.num_training_batches)
        mean_loss = torch.stack([x.cpu() for x in losses]).mean().item() if losses else None
        self.record["log"].append({"epoch": round(epoch, 4), "step": trainer.global_step, "training_loss": mean_loss,
                                   **next(iter(sets.values())).metrics})
        self.record["evaluation"]["val"] = {name: scored.metrics for name, scored in sets.items()}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sets = pl_module.latest_evaluation.get("test", {})
        self.record["evaluation"]["test"] = {name: scored.metrics for name, scored in sets.items()}

    def record_merge(self, merge: dict, chosen: dict[str, dict[str, float]]) -> None:
        """The merge with the base that MergeWithBase chose (`merge`: its curve and α), and the validation metrics
        of the model the run now ends with, θ(α), in place of the fine-tuned weights' (the curve keeps theirs)."""
        self.record["merge"] = merge
        self.record["evaluation"]["val"] = chosen

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


def constructor_defaults(cls) -> dict:
    """The default of each of a class's constructor arguments that has one, as the run record keeps them."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def framework_versions() -> dict[str, str]:
    import tokenizers
    import transformers

    versions = {"Python": platform.python_version(), "minilm_sts": __version__, "Lightning": L.__version__,
                "Transformers": transformers.__version__, "PyTorch": torch.__version__,
                "Tokenizers": tokenizers.__version__}
    return {name: str(version) for name, version in versions.items()}  # plain str: checkpoints load weights_only
