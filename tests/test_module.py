"""SentenceEmbedder: schedule, parameter groups, clipping and skipped steps under fp16, determinism, checkpoints
that load offline."""

import contextlib
import shutil

import lightning as L
import pytest
import torch

from minilm_sts.datamodule import PairDataModule
from minilm_sts.module import SentenceEmbedder, lr_multiplier
from minilm_sts.module_callbacks import RunRecord, SkippedStepCounter


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
    model = SentenceEmbedder(pretrained=str(tiny_model_dir), weight_decay=0.01)
    model.trainer = L.Trainer(max_steps=10, logger=False)  # only for estimated_stepping_batches
    groups = model.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert "encoder.encoder.layer.0.attention.self.query.weight" in decayed
    assert "encoder.embeddings.LayerNorm.weight" in exempt and "encoder.encoder.layer.1.output.dense.bias" in exempt
    assert "encoder.pooler.dense.weight" not in decayed | exempt  # frozen, never optimised


def test_warmup_steps_and_ratio_are_exclusive(tiny_model_dir):
    with pytest.raises(ValueError, match="not both"):
        SentenceEmbedder(pretrained=str(tiny_model_dir), warmup_steps=10, warmup_ratio=0.1)


def fit_one_step(model_dir, pair_files, tmp_path, **trainer_args):
    L.seed_everything(0)
    model = SentenceEmbedder(pretrained=str(model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=40)
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

    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 gradients at first
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(model, data)
    skipped = SkippedStepCounter.of(trainer).skipped
    assert skipped >= 1
    assert trainer.callback_metrics["train/skipped_steps"] == skipped
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
        return model, RunRecord.of(trainer).record

    (reference, reference_record), (other, other_record) = fit(0), fit(workers)
    assert [r["spearman_cosine"] for r in reference_record["log"]] == pytest.approx(
        [r["spearman_cosine"] for r in other_record["log"]], abs=1e-6)
    for a, b in zip(reference.parameters(), other.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoint_loads_without_the_pretrained_folder(tiny_model_dir, pair_files, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    model, _ = fit_one_step(model_dir, pair_files, tmp_path / "run")
    path = tmp_path / "model.ckpt"
    model.trainer.save_checkpoint(path)
    before = model.encode(["a man is playing the guitar", "a dog"])
    shutil.rmtree(model_dir)  # nothing may be read from (or downloaded for) the original folder now

    assert torch.load(path, weights_only=True)["hyper_parameters"]["encoder_config"]["hidden_size"] == 32
    loaded = SentenceEmbedder.load_from_checkpoint(path)
    assert torch.allclose(loaded.encode(["a man is playing the guitar", "a dog"]), before, atol=1e-6)


def test_encode_returns_input_order_and_unit_norm(tiny_model_dir):
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    sentences = ["a dog", "a man is playing the guitar on the street with a child", "cats", "the woman eats food"]
    together = model.encode(sentences, batch_size=2)
    one_by_one = torch.cat([model.encode([s]) for s in sentences])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(4), atol=1e-6)
    assert not torch.allclose(model.encode(sentences, normalize=False).norm(dim=1), torch.ones(4))
    with pytest.raises(TypeError, match="list of sentences"):
        model.encode("a dog")


@pytest.mark.slow
def test_compiled_padded_path_matches_the_packed_path_and_reuses_its_graphs(tiny_model_dir):
    """`compile=True` gives the packed path's embeddings and gradients, and batches of new widths and sizes
    reuse the compiled code: a static graph, then one dynamic in width, then one dynamic in batch size."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = SentenceEmbedder(pretrained=str(tiny_model_dir)).eval()  # eval: no dropout, gradients still on
    compiled = SentenceEmbedder(pretrained=str(tiny_model_dir), compile=True).eval()
    generator = torch.Generator().manual_seed(0)
    for index, (batch, longest) in enumerate([(6, 5), (6, 17), (4, 40), (6, 30), (3, 12)]):
        lengths = torch.randint(2, longest + 1, (batch,), generator=generator)
        lengths[0] = longest
        ids = torch.randint(5, 40, (int(lengths.sum()),), generator=generator)
        warns_once = pytest.warns(UserWarning, match="meant for GPUs") if index == 0 else contextlib.nullcontext()
        with warns_once:  # the CPU warning comes with the first compilation
            got = compiled(ids, lengths)
        expected = eager(ids, lengths)
        assert torch.allclose(got, expected, atol=1e-5)
        expected.square().sum().backward()
        got.square().sum().backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None and not name.endswith("key.bias"):  # key-bias gradients are exactly 0 in theory
                assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-6 * a.grad.abs().max()), name
        eager.zero_grad()
        compiled.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    with torch.no_grad():  # validation and encode compile a gradient-free graph of their own
        assert torch.allclose(compiled(ids, lengths), eager(ids, lengths), atol=1e-5)


def test_encode_runs_batches_side_by_side_on_cpu_threads_with_the_same_result(tiny_model_dir, monkeypatch):
    import minilm_sts.module as module

    pools = []

    class RecordingPool(module.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self._max_workers)

    monkeypatch.setattr(module, "ThreadPoolExecutor", RecordingPool)
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    sentences = [" ".join(["dog", "runs", "on", "the", "street"][: 1 + i % 5]) + f" {i}" for i in range(30)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        side_by_side = model.encode(sentences, batch_size=4)
        assert pools == [2] and torch.get_num_threads() == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast reaches the worker threads
            in_bf16 = model.encode(sentences, batch_size=4)
        assert pools == [2, 2]
        torch.set_num_threads(1)
        one_at_a_time = model.encode(sentences, batch_size=4)
        assert pools == [2, 2]  # one thread: no pool
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(side_by_side, one_at_a_time, atol=1e-6)
    assert not torch.allclose(in_bf16, side_by_side, atol=1e-4) and torch.allclose(in_bf16, side_by_side, atol=0.05)
