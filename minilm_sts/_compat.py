"""Every use of a framework internal, each behind one small function that says what it relies on.

Lightning and torch do not promise these across releases; pyproject bounds both to the versions CI runs, and
tests/test_compat.py checks each assumption, so an upgrade that breaks one fails there by name rather than as
a wrong number somewhere in a run.
"""

from __future__ import annotations

import platform

import torch


def optimizer_unscales_in_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` unscales fp16 gradients inside its own `step()` (fused AdamW does), so GradScaler
    must be told to unscale before anyone reads the gradients.

    Relies on Lightning's private `lightning.fabric.plugins.precision.amp._optimizer_handles_unscaling`, which
    reads torch's private `_step_supports_amp_scaling` flag on the optimizer."""
    # Imported here: the encoder imports this module too, and it must not pull in Lightning.
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    return _optimizer_handles_unscaling(optimizer)


def epoch_batch_index(trainer) -> int:
    """The index, within its epoch, of the training batch the trainer is at (also during a validation run
    between training batches).

    Relies on `trainer.fit_loop.epoch_loop.batch_idx`."""
    return trainer.fit_loop.epoch_loop.batch_idx


def epoch_batches_fetched(trainer) -> int:
    """How many training batches of the current epoch have been fetched, the current one included: in
    `on_train_batch_end` it equals `num_training_batches` at the epoch's last batch.

    Relies on `trainer.fit_loop.epoch_loop.batch_progress.current.ready`."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def epoch_batches_trained(trainer) -> int:
    """How many training batches of the current epoch have been trained on, the current one included once its
    step has run (so a checkpoint saved at that step counts it), restored from a checkpoint on resume.

    Relies on `trainer.fit_loop.epoch_loop.batch_progress.current.processed`."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def step_loss(trainer, outputs) -> torch.Tensor:
    """The loss `training_step` returned, from the `outputs` that training-batch hooks receive.

    Relies on Lightning handing those hooks `{"loss": loss / accumulate_grad_batches}` (detached) under
    automatic optimization."""
    return outputs["loss"] * trainer.accumulate_grad_batches


def no_silent_recompile_fallback():
    """A context in which a compiled function recompiled beyond torch's limit (`recompile_limit` shapes) raises,
    instead of running eagerly from then on with only a log line to say so.

    Relies on `torch._dynamo.config.fail_on_recompile_limit_hit` and the config's `patch`."""
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def is_logging_step(trainer) -> bool:
    """Whether the training step under way is one whose logged values reach the loggers: every
    `log_every_n_steps`-th. Values read back from the device only then keep the other steps free of host syncs.

    Relies on the logger connector's `should_update_logs`, which Lightning checks after each training step."""
    return trainer._logger_connector.should_update_logs


def loss_scale(scaler) -> torch.Tensor | None:
    """GradScaler's current scale as the tensor it keeps on the device (None before its first step), so that a
    change can be noticed without reading it back as `get_scale()` does.

    Relies on GradScaler's private `_scale`."""
    return scaler._scale


def receive_set_epoch(batch_sampler) -> None:
    """Make Lightning's per-epoch `set_epoch(epoch)` call reach `batch_sampler` itself.

    Relies on Lightning's private `lightning.fabric.utilities.data._set_sampler_epoch`, which calls
    `set_epoch` on a loader's `sampler` and on its `batch_sampler.sampler`, never on the batch sampler: so the
    batch sampler names itself as its own sampler."""
    batch_sampler.sampler = batch_sampler


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through oneDNN's matrix product (fp32, CPU, no autograd).

    Relies on torch's private operator `torch.ops.mkldnn._linear_pointwise` and its argument list
    (input, weight, bias, post-op name, post-op scalars, post-op algorithm)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def validate_within_fit(trainer) -> None:
    """Run the fit's validation loop once, now (from `on_train_start`, before any step), as the training loop
    does between batches: its metrics are logged at the current step and every validation hook runs.

    Relies on `trainer.fit_loop.epoch_loop.val_loop` (set up by the time `on_train_start` runs), the
    `trainer.validating` / `trainer.training` stage flags, and the logger connector's private
    `_first_loop_iter`, which the training loop saves and restores around its own validations."""
    first_loop_iter = trainer._logger_connector._first_loop_iter
    trainer.validating = True
    trainer.fit_loop.epoch_loop.val_loop.run()
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX-512 BF16 or AMX on x86; on other CPUs, whether oneDNN
    has a bf16 path.

    Relies on torch's private `torch.cpu._is_avx512_bf16_supported`, `torch.cpu._is_amx_tile_supported` and
    `torch.ops.mkldnn._is_mkldnn_bf16_supported`."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def save_last_checkpoint(checkpoint, trainer) -> None:
    """Make a ModelCheckpoint write its `last.ckpt` now, with the metrics it would monitor.

    Relies on ModelCheckpoint's private `_save_last_checkpoint(trainer, monitor_candidates)` and
    `_monitor_candidates(trainer)`."""
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


def drop_unset_wandb_anonymous(logger) -> None:
    """Leave `anonymous` out of the arguments a WandbLogger passes to `wandb.init` when it is None: WandbLogger
    always passes it, and wandb warns that the setting has no effect even then.

    Relies on WandbLogger's private `_wandb_init` dict of keyword arguments."""
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)


def hf_dataset_fingerprint(dataset) -> str | None:
    """The fingerprint `datasets` keeps of a loaded Dataset's content (None where it keeps none).

    Relies on `datasets.Dataset._fingerprint`."""
    return getattr(dataset, "_fingerprint", None)


class TrainerCallbacksCLI:
    """A LightningCLI mixin: `trainer_callbacks(config, callbacks)` may change the trainer's configuration and
    callbacks just before the trainer is built.

    Relies on LightningCLI's private `_instantiate_trainer(config, callbacks)`, where both are at hand."""

    def trainer_callbacks(self, config: dict, callbacks: list) -> list:
        return callbacks

    def _instantiate_trainer(self, config: dict, callbacks: list):
        return super()._instantiate_trainer(config, self.trainer_callbacks(config, callbacks))
