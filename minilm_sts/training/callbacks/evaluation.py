"""Evaluation during a run: `SplitEvaluation` scores validation and test splits whole, logs their metrics and
leaves each set's scores in the one place that other callbacks read them, the module's `latest_evaluation`;
`ValidateBeforeTraining` validates the base model once before the first step when the forgetting guard is on."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.seed import isolate_rng

from minilm_sts._compat import validate_within_fit
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.evaluation.pair_scores import PairScores, ScoredSet


class SplitEvaluation(L.Callback):
    """Scores each evaluation split whole, from the per-pair cosines that `validation_step` / `test_step` return.

    Each evaluation set (dataloader) accumulates into its own `PairScores`. At the end of the split, every set's
    metrics are logged as `<stage>/<set>/<metric>` when there are several sets, and the first (monitored) set's
    also as `<stage>/<metric>`. The buffers are emptied every time, also after the sanity check, so its batches
    never leak into the first real validation. Each set's `ScoredSet` (scores, labels and metrics), first set
    first, goes to the module's `latest_evaluation[stage]`, where the run record and the cosine picture read it.
    """

    def __init__(self):
        self._scores: dict[tuple[str, int], PairScores] = {}

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
        sets = {name: with_retrieval(trainer, pl_module, stage, name, self._scores.pop((stage, index)).compute())
                for name, index in zip(names, indices)}
        pl_module.latest_evaluation[stage] = sets
        logged = {f"{stage}/{metric}": value for metric, value in next(iter(sets.values())).metrics.items()}
        if len(names) > 1:
            logged.update({f"{stage}/{name}/{metric}": value
                           for name, scored in sets.items() for metric, value in scored.metrics.items()})
        pl_module.log_dict(logged, prog_bar=len(names) == 1, add_dataloader_idx=False)


RETRIEVAL_PROGRESS_FROM = 20_000  # corpus sentences: from here on, embedding the corpus shows a progress bar


def with_retrieval(trainer: L.Trainer, pl_module: L.LightningModule, stage: str, name: str,
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


class ValidateBeforeTraining(L.Callback):
    """When PairDataModule's forgetting guard is on, validates every set once as a fresh fit starts, before the
    first step, so the base model's scores are logged at step 0 and the run shows them beside the trained ones
    (`RunRecord` keeps them as `before_training`: the one validation of a fit at step 0). The pass leaves the
    random stream as it found it, so training is the same with or without it; a resumed fit does not repeat it."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        if not isinstance(data, PairDataModule) or data.guard is None or trainer.ckpt_path or trainer.global_step:
            return
        with isolate_rng():  # a loader without its own generator would draw its seed from the global stream
            validate_within_fit(trainer)


