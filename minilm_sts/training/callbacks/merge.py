"""Merging with the base (WiSE-FT): at the end of a fit, θ(α) = (1−α)·θ_base + α·θ_tuned is scored for a few α
on the monitored validation metric and on the forgetting guard, and the run keeps the best α whose guard is at
least the base model's. `MergeWithBase` does it; `interpolate` and `choose_alpha` are the two rules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from minilm_sts.atomic import write_file_atomically
from minilm_sts.data.pair_data_module import GUARD_SOURCE, PairDataModule
from minilm_sts.errors import UserInputError
from minilm_sts.evaluation.pair_scores import PairScores
from minilm_sts.model.checkpoint import ENCODER_PREFIX
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.training.callbacks.evaluation import with_retrieval
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.run_folder import checkpoint_folder

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
GUARD_METRIC = "spearman_cosine"
DEFAULT_MONITOR = ("val/spearman_cosine", "max")  # what checkpoints are selected on when nothing else is said


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) of two state dicts with the same keys, (1−α)·base + α·tuned for every floating-point tensor, by
    torch.lerp, which gives `base` exactly at α = 0 and `tuned` exactly at α = 1 (it computes from the nearer end);
    tensors that are not floating point are the tuned model's."""
    if base.keys() != tuned.keys():
        raise ValueError(f"the base and the fine-tuned weights differ in names: {sorted(base.keys() ^ tuned.keys())}")
    return {key: torch.lerp(base[key].to(value.dtype), value, alpha) if value.is_floating_point() else value
            for key, value in tuned.items()}


def choose_alpha(curve: list[dict], mode: str) -> float:
    """The α of the curve's best `dev` value (highest for mode "max", lowest for "min") among the rows whose `guard`
    is at least the base's (the row at α = 0); every row qualifies when there is no guard (`guard` None). The base
    itself always qualifies, so it is the answer when no merge keeps the guard. Ties go to the smaller α, nearer
    the base."""
    base = next(row for row in curve if row["alpha"] == 0)
    kept = [row for row in sorted(curve, key=lambda row: row["alpha"])
            if row["guard"] is None or row["guard"] >= base["guard"]]
    pick = max if mode == "max" else min
    return pick(kept, key=lambda row: row["dev"])["alpha"]


def checked_alphas(alphas: Sequence[float]) -> list[float]:
    """The α to score, sorted, with 0 (the base: the guard's reference and the fallback) always among them."""
    if any(not 0 <= alpha <= 1 for alpha in alphas):
        raise UserInputError("merge alphas must lie between 0 (the base) and 1 (the fine-tuned model), "
                             f"got {list(alphas)}")
    if not any(alphas):
        raise UserInputError("merge alphas: give at least one α above 0 (0 is the base model, always scored)")
    return sorted({0.0, *map(float, alphas)})


class MergeWithBase(L.Callback):
    """At the end of `fit`, merge the fine-tuned weights with the base model's (WiSE-FT) at the α the run chooses.

    For each α in `alphas` (and 0), the module gets θ(α) = (1−α)·θ_base + α·θ_tuned, where θ_tuned is what the
    module holds when training ends (last.ckpt's weights; under EMAWeightAveraging the averaged ones) and θ_base
    is read again from its `pretrained` model (so no second copy sits on the GPU during training). Every
    validation set is scored as a validation scores it, but outside the validation loop: no checkpoint, log row
    or picture records a candidate. The chosen α has the best checkpoint-monitor metric (`val/<metric>` or
    `val/<set>/<metric>`, the checkpoint's mode) among those whose guard, spearman_cosine on the packaged STS-B
    dev set (added by the forgetting guard or named by the recipe), is at least the base's; the base (α = 0)
    always qualifies, so when no merge keeps the guard the run keeps the base model and says so. Without STS-B
    dev among the validation sets, the monitor alone decides.

    The module then holds θ(α*); the run record gets the curve (`merge`) and θ(α*)'s validation metrics; the
    loggers get the curve (a table and a chart in W&B); and `merged-alpha<α*>.ckpt` is written beside last.ckpt,
    which keeps the fine-tuned weights. `enabled` switches it off (the command line's `merge` group defaults
    it to false; the duplicates recipe turns it on)."""

    def __init__(self, enabled: bool = True, alphas: Sequence[float] = DEFAULT_ALPHAS):
        self.enabled = enabled
        self.alphas = checked_alphas(alphas)
        self.checkpoint_path = ""  # the merged checkpoint, once written
        self.merge: dict = {}  # what the run record keeps, once chosen

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            self._target(trainer)  # a monitor that names no validation set stops the run before training

    def _target(self, trainer: L.Trainer) -> tuple[str, str, str, str]:
        """(monitor key, mode, validation set, metric) that the α is chosen on."""
        data = trainer.datamodule
        if not isinstance(data, PairDataModule) or not data.sources["val"]:
            raise UserInputError("merge with the base needs validation data (a PairDataModule with a val_path)")
        monitor = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        key, mode = (monitor.monitor, monitor.mode) if monitor else DEFAULT_MONITOR
        stage, _, rest = key.partition("/")
        set_name, _, metric = rest.rpartition("/")
        names = data.eval_names("val")
        if stage != "val" or (set_name and set_name not in names):
            raise UserInputError(f"merge with the base chooses on the checkpoint monitor, but {key} is not a metric of "
                                 f"a validation set ({', '.join(names)}); monitor val/<metric> or val/<set>/<metric>")
        return key, mode, set_name or names[0], metric

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.fast_dev_run:
            return
        key, mode, set_name, metric = self._target(trainer)
        guard = guard_set(trainer.datamodule)
        tuned = {name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()}
        base = base_weights(pl_module)
        curve, scored = [], {}
        for alpha in self.alphas:
            pl_module.load_state_dict(interpolate(base, tuned, alpha))
            scored[alpha] = score_validation(trainer, pl_module)
            curve.append({"alpha": alpha, "dev": _metric(scored[alpha], set_name, metric),
                          "guard": scored[alpha][guard][GUARD_METRIC] if guard else None})
        chosen = choose_alpha(curve, mode)
        pl_module.load_state_dict(interpolate(base, tuned, chosen))
        self.merge = {"monitor": key, "mode": mode, "guard": f"val/{guard}/{GUARD_METRIC}" if guard else None,
                      "base": pl_module.hparams.pretrained, "curve": curve, "chosen": chosen}
        rank_zero_info(describe_merge(self.merge))
        if guard and chosen == 0:
            rank_zero_warn("Merge with the base: no merge with the fine-tuned weights kept the forgetting guard at "
                           "the base model's value, so the run keeps the base model (α = 0)")
        for record in (c for c in trainer.callbacks if isinstance(c, RunRecord)):
            record.record_merge(self.merge, scored[chosen])
        log_curve(trainer, self.merge)
        if trainer.checkpoint_callbacks:
            self.checkpoint_path = str(save_merged(trainer, pl_module, f"merged-alpha{chosen:g}.ckpt"))


def guard_set(data: PairDataModule) -> str | None:
    """The validation set that shows forgetting: the packaged STS-B dev set, whether the forgetting guard added it
    or the recipe names it (the duplicates recipe does, which leaves the guard itself out)."""
    return next((name for name, source in data.sources["val"].items() if source == GUARD_SOURCE), None)


def base_weights(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The weights that fine-tuning started from, read again from the module's `pretrained` onto the CPU, under
    the module's own state-dict names."""
    encoder = SentenceEncoder.from_pretrained(pl_module.hparams.pretrained, pl_module.hparams.max_seq_length)
    return {ENCODER_PREFIX + name: value for name, value in encoder.state_dict().items()}


def score_validation(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
    """Every validation set's metrics for the weights the module holds now, as a validation computes them: each
    set whole through `validation_step`, in the run's precision, gathered from every process, with duplicate
    retrieval where the data module has it."""
    data = trainer.datamodule
    loaders = data.val_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    was_training = pl_module.training
    pl_module.eval()
    sets = {}
    for name, loader in zip(data.eval_names("val"), loaders):
        scores = PairScores().to(pl_module.device)
        with torch.inference_mode(), trainer.precision_plugin.val_step_context():
            for index, batch in enumerate(loader):
                batch = trainer.strategy.batch_to_device(batch)
                scores.update(pl_module.validation_step(batch, index), batch["labels"], batch["indices"])
        sets[name] = with_retrieval(trainer, pl_module, "val", name, scores.compute()).metrics
    pl_module.train(was_training)
    return sets


def _metric(sets: dict[str, dict[str, float]], set_name: str, metric: str) -> float:
    if metric not in sets[set_name]:
        raise UserInputError(f"merge with the base: the validation set {set_name} has no metric {metric}; "
                             f"it has {', '.join(sets[set_name])}")
    return sets[set_name][metric]


def describe_merge(merge: dict) -> str:
    """The curve as the log shows it, one line per α, and the choice."""
    guard = merge["guard"] or "no forgetting guard"
    lines = [f"Merge with the base ({merge['base']}): {merge['monitor']} and {guard} for each α"]
    for row in merge["curve"]:
        guard_value = "" if row["guard"] is None else f"   guard {row['guard']:.4f}"
        marker = "   <- chosen" if row["alpha"] == merge["chosen"] else ""
        lines.append(f"  α {row['alpha']:.2f}   {row['dev']:.4f}{guard_value}{marker}")
    return "\n".join(lines)


def log_curve(trainer: L.Trainer, merge: dict) -> None:
    """The chosen α and its values to every logger; to W&B also the whole curve, as a table and a chart."""
    chosen = next(row for row in merge["curve"] if row["alpha"] == merge["chosen"])
    values = {"merge/alpha": chosen["alpha"], f"merge/{merge['monitor']}": chosen["dev"]}
    if merge["guard"]:
        values[f"merge/{merge['guard']}"] = chosen["guard"]
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            import wandb

            columns = ["alpha", merge["monitor"], *([merge["guard"]] if merge["guard"] else [])]
            rows = [[row["alpha"], row["dev"], *([row["guard"]] if merge["guard"] else [])] for row in merge["curve"]]
            logger.log_table("merge/curve", columns=columns, data=rows)
            logger.experiment.log({"merge/curve_chart": wandb.plot.line_series(
                xs=[row[0] for row in rows], ys=[[row[i] for row in rows] for i in range(1, len(columns))],
                keys=columns[1:], title="Merge with the base", xname="alpha")})


def save_merged(trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
    """Save θ(α*), which the module holds, beside the run's checkpoints: a checkpoint with every callback's state
    (the run record and its curve among them) but no optimizer state, since it is a model to use and not a
    point to resume from. Under EMAWeightAveraging, Lightning would save its average (θ_tuned) as the weights:
    the module's own are put back."""
    path = checkpoint_folder(trainer) / name
    merged = {key: value.detach().cpu() for key, value in pl_module.state_dict().items()}
    trainer.save_checkpoint(path)
    if trainer.is_global_zero:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["state_dict"] = merged
        for key in ("optimizer_states", "lr_schedulers", "current_model_state", "averaging_state"):
            checkpoint.pop(key, None)
        write_file_atomically(path, lambda partial: torch.save(checkpoint, partial))
    trainer.strategy.barrier()
    return path


def merged_checkpoint(trainer: L.Trainer) -> str:
    """The merged checkpoint this fit wrote, or "" when it wrote none."""
    return next((c.checkpoint_path for c in trainer.callbacks if isinstance(c, MergeWithBase)), "")
