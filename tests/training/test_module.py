"""SentenceEncoderTraining: schedule, parameter groups, clipping and skipped steps under fp16, determinism, the loss
option."""

import re

import lightning as L
import pytest
import torch

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.errors import UserInputError
from minilm_sts.model.bert import PackedLayout, PaddingPlan
from minilm_sts.training.callbacks.mixed_precision import SkippedStepCounter
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.optimization import lr_multiplier
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import attached


@pytest.mark.parametrize("warmup, total", [(0, 50), (10, 50), (7, 7)])
def test_linear_schedule_equals_hugging_face(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make(optimizer)
        out = []
        for _ in range(total):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    ours = rates(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_multiplier("linear", warmup, total)))
    reference = rates(lambda o: get_linear_schedule_with_warmup(o, warmup, total))
    assert ours == pytest.approx(reference, abs=1e-12)


def test_bias_and_layernorm_are_exempt_from_weight_decay(tiny_model_dir):
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), weight_decay=0.01)
    model.trainer = L.Trainer(max_steps=10, logger=False)  # only for estimated_stepping_batches
    groups = model.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert "sentence_encoder.bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert ("sentence_encoder.bert.embeddings.LayerNorm.weight" in exempt
            and "sentence_encoder.bert.encoder.layer.1.output.dense.bias" in exempt)
    assert "sentence_encoder.bert.pooler.dense.weight" not in decayed | exempt  # frozen, never optimised


def test_warmup_steps_and_ratio_are_exclusive(tiny_model_dir):
    with pytest.raises(ValueError, match="not both"):
        SentenceEncoderTraining(pretrained=str(tiny_model_dir), warmup_steps=10, warmup_ratio=0.1)


def fit_one_step(model_dir, pair_files, tmp_path, **trainer_args):
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=40, forgetting_guard=False)
    trainer = L.Trainer(max_steps=1, logger=L.pytorch.loggers.CSVLogger(tmp_path), limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1, **trainer_args)
    trainer.fit(model, data)
    return model, trainer.callback_metrics["train/grad_norm"].item()


def test_clipping_works_with_fused_adamw_under_fp16_loss_scaling(tiny_model_dir, pair_files, tmp_path):
    """Lightning refuses this combination itself; our clipping must see the true (unscaled) gradient norm."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    fp32_model, fp32_norm = fit_one_step(tiny_model_dir, pair_files, tmp_path / "a")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fp16_model, fp16_norm = fit_one_step(tiny_model_dir, pair_files, tmp_path / "b",
                                         plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert fp16_model.trainer.optimizers[0].defaults["fused"]
    assert fp16_norm == pytest.approx(fp32_norm, rel=0.05)  # a still-scaled norm would be 65536 times larger
    for p16, p32 in zip(fp16_model.parameters(), fp32_model.parameters()):
        assert torch.allclose(p16, p32, atol=1e-3)


def test_fp16_skipped_steps_are_counted(tiny_model_dir, pair_files, tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8, forgetting_guard=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 gradients at first
    trainer = L.Trainer(max_steps=4, log_every_n_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(model, data)
    skipped = attached(trainer, SkippedStepCounter).skipped
    assert skipped >= 1
    assert trainer.callback_metrics["train/skipped_steps"] == skipped
    assert scaler.get_scale() < 2.0**40


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_metrics_with_or_without_workers(tiny_model_dir, pair_files, tmp_path, workers):
    def fit(num_workers):
        L.seed_everything(42)
        model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), lr=1e-3)
        data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8,
                              num_workers=num_workers, forgetting_guard=False)
        trainer = L.Trainer(max_epochs=2, val_check_interval=5, check_val_every_n_epoch=None, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
        trainer.fit(model, data)
        return model, attached(trainer, RunRecord).record

    (reference, reference_record), (other, other_record) = fit(0), fit(workers)
    assert [r["spearman_cosine"] for r in reference_record["log"]] == pytest.approx(
        [r["spearman_cosine"] for r in other_record["log"]], abs=1e-6)
    for a, b in zip(reference.parameters(), other.parameters()):
        assert torch.allclose(a, b, atol=1e-6)



def fit_losses(model_dir, pair_files, **model_args) -> tuple[list[float], SentenceEncoderTraining]:
    """The training loss of each step of a 2-epoch, 10-step fit, and the trained model."""
    losses = []

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    L.seed_everything(42)
    model = SentenceEncoderTraining(pretrained=str(model_dir), lr=1e-3, **model_args)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[RecordLoss()])
    trainer.fit(model, data)
    return losses, model


def test_the_default_loss_is_cosine_mse_and_trains_bit_identically(tiny_model_dir, pair_files):
    from minilm_sts.training.losses import cosine_mse_loss

    default_losses, default = fit_losses(tiny_model_dir, pair_files)
    named_losses, named = fit_losses(tiny_model_dir, pair_files, loss="cosine_mse", loss_params={})
    assert default.hparams.loss == "cosine_mse" and default.hparams.loss_params is None
    assert default._losses[None].func is cosine_mse_loss
    assert len(default_losses) == 10 and default_losses == named_losses  # exactly, not approximately
    for a, b in zip(default.parameters(), named.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss, params, message", [
    ("cosine", None, "unknown loss 'cosine'; choose one of: cosine_mse, cosent, angle, mnrl"),
    ("cosent", {"scale": 0}, "loss 'cosent' parameter 'scale' must be a positive number"),
    ("mnrl", {"temperature": 0.05}, "loss 'mnrl' has no parameter 'temperature'; its parameters: scale, symmetric"),
    ({"quora": "mnrl", "stsb": "cosine"}, None, "unknown loss 'cosine'"),
    ({"quora": "mnrl"}, {"quora": {"scale": -1}}, "loss 'mnrl' parameter 'scale' must be a positive number"),
    ({"quora": "mnrl"}, {"scale": 20.0}, "loss_params names training sets ['scale'] that loss does not"),
    ({}, None, "loss is an empty mapping"),
])
def test_a_bad_loss_or_parameter_fails_at_construction(tiny_model_dir, loss, params, message):
    with pytest.raises(UserInputError, match=re.escape(message)):
        SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss=loss, loss_params=params)


def test_the_loss_and_its_parameters_are_plain_saved_hyperparameters(tiny_model_dir, tmp_path):
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss="mnrl",
                             loss_params={"scale": 10.0, "symmetric": True})
    torch.save({"hyper_parameters": dict(model.hparams)}, tmp_path / "h.pt")
    saved = torch.load(tmp_path / "h.pt", weights_only=True)["hyper_parameters"]
    assert saved["loss"] == "mnrl" and saved["loss_params"] == {"scale": 10.0, "symmetric": True}
    assert model.losses_for(["a", "b"]) == {"a": "mnrl", "b": "mnrl"}
    per_set = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss={"a": "mnrl", "b": "cosent"})
    assert per_set.losses_for(["b", "a"]) == {"b": "cosent", "a": "mnrl"}
    with pytest.raises(UserInputError, match=re.escape("loss names the training sets ['a', 'b'], but they are ['a']")):
        per_set.losses_for(["a"])


@pytest.mark.parametrize("compile, device, compiles", [(None, "cuda", True), (None, "cpu", False),
                                                       (False, "cuda", False), (True, "cpu", True)])
def test_by_default_a_fit_compiles_on_a_gpu_only_and_its_data_batches_for_that_path(tiny_model_dir, pair_files,
                                                                                   monkeypatch, compile, device,
                                                                                   compiles):
    # The choice a GPU run makes, on the CPU: only the device the trainer reports differs.
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), compile=compile)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), forgetting_guard=False)
    trainer = L.Trainer(accelerator="cpu", logger=False)
    monkeypatch.setattr(type(trainer.strategy), "root_device", property(lambda self: torch.device(device)))
    trainer.datamodule = data
    model._trainer = trainer
    model.configure_callbacks()
    assert model.sentence_encoder.use_compile is compiles
    layout = data.batch_layout(torch.tensor([3, 20]))
    assert isinstance(layout, PaddingPlan if compiles else PackedLayout)
    assert not compiles or layout.attention_mask.shape == (2, 32)  # widths rounded up to a multiple of 16
