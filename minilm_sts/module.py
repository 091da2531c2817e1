"""SentenceEmbedder: the LightningModule that fine-tunes a SentenceEncoder with cosine-MSE."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

from minilm_sts.embedder import SentenceEncoder, tokenizer_files, tokenizer_from_files
from minilm_sts.encoder import BertConfig, BertModel
from minilm_sts.errors import UserInputError
from minilm_sts.pretrained import DEFAULT_MODEL
from minilm_sts.losses import cosine_mse_loss
from minilm_sts.similarity import correlations

TOKENIZER_CHECKPOINT_KEY = "minilm_sts_tokenizer_files"
RUN_CHECKPOINT_KEY = "minilm_sts_run"
RESUME_CHECKPOINT_KEY = "minilm_sts_resume"
# The SentenceEncoder's weights in the state dict; checkpoints written before there was one (up to commit
# 3722055) hold its BERT under `encoder.`.
EMBEDDER_PREFIX, BERT_PREFIX, LEGACY_BERT_PREFIX = "embedder.", "embedder.bert.", "encoder."


class SentenceEmbedder(L.LightningModule):
    """Trains a SentenceEncoder (`self.embedder`, mean-pooled BERT) so that cos(u, v) regresses the pair's label.

    Args:
        pretrained: a Hugging Face Hub id or a local model folder (config.json, model.safetensors, tokenizer).
        max_seq_length: sentences are truncated to this many tokens, [CLS] and [SEP] included.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        decay_bias_and_norm: also decay biases and LayerNorm weights (the usual recipe exempts them).
        warmup_steps: linear warmup length in optimizer steps.
        warmup_ratio: warmup as a fraction of all steps (rounded up); use instead of warmup_steps.
        scheduler: "linear" decays to 0 at the last step after warmup; "constant" holds after warmup.
        max_grad_norm: clip the global gradient L2 norm to this (0 disables).
        fused_optimizer: use torch's fused AdamW kernel.
        compile: run the BERT through `torch.compile` on a padded path (see SentenceEncoder); for GPUs.
        encoder_config: the BERT architecture. Filled in from `pretrained` on first build and saved in
            checkpoints, so loading a checkpoint builds the model without reading `pretrained`.
    """

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        max_seq_length: int = 128,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        decay_bias_and_norm: bool = False,
        warmup_steps: int = 0,
        warmup_ratio: Optional[float] = None,
        scheduler: Literal["linear", "constant"] = "linear",
        max_grad_norm: float = 1.0,
        fused_optimizer: bool = True,
        compile: bool = False,
        encoder_config: Optional[dict] = None,
    ):
        super().__init__()
        if warmup_ratio is not None and warmup_steps:
            raise UserInputError("give warmup_steps or warmup_ratio, not both")
        self.save_hyperparameters()
        if encoder_config is None:
            self.embedder = SentenceEncoder.from_pretrained(pretrained, max_seq_length, compile)
            self.hparams.encoder_config = self.embedder.bert.config.to_dict()
        else:  # from a checkpoint, which also holds the weights and the tokenizer
            bert = BertModel(BertConfig.from_dict(encoder_config))
            self.embedder = SentenceEncoder(bert, None, max_seq_length, compile, pretrained)
        # What the run did, in plain values, for the model card: datasets, a row per validation, test scores.
        self.run_record: dict = {"datasets": {}, "log": [], "test": {}}
        self._loss_since_validation: list[torch.Tensor] = []
        self._resume_state: Optional[dict] = None
        self.skipped_steps = 0  # optimizer steps GradScaler skipped (fp16) in this process
        self._scale_before_step: Optional[float] = None
        # (stage, evaluation set) -> per batch, rows [cosine; label; pair index]
        self._scores: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        # The latest split's (cosine, label) pairs, for pictures of separation.
        self.last_scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----- tokenizer and inference -----------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The embedder's tokenizer, which the data module tokenizes with; checkpoints carry it."""
        return self.embedder.tokenizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_CHECKPOINT_KEY] = tokenizer_files(self.tokenizer)
        checkpoint[RUN_CHECKPOINT_KEY] = self.run_record
        checkpoint[RESUME_CHECKPOINT_KEY] = {"rng": _rng_states(),
                                             "loss_since_validation": [x.item() for x in self._loss_since_validation]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        self.run_record = checkpoint.get(RUN_CHECKPOINT_KEY, self.run_record)
        self._resume_state = checkpoint.get(RESUME_CHECKPOINT_KEY)
        files = checkpoint.get(TOKENIZER_CHECKPOINT_KEY)
        if files:
            self.embedder.tokenizer = tokenizer_from_files(files)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of packed sentences (see SentenceEncoder.forward)."""
        return self.embedder(input_ids, lengths)

    def encode(self, *args, **kwargs) -> torch.Tensor:
        """The embedder's `encode` (SentenceEncoder.encode), for a model loaded with load_from_checkpoint."""
        return self.embedder.encode(*args, **kwargs)

    # ----- steps -----------------------------------------------------------------------------------------------

    def _pair_embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"], batch["lengths"]).chunk(2)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        u, v = self._pair_embeddings(batch)
        loss = cosine_mse_loss(u, v, batch["labels"])
        if not torch.isfinite(loss):
            self._stop_on_non_finite_loss(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(u))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=len(u))
        self._loss_since_validation.append(loss.detach())
        return loss

    def _stop_on_non_finite_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop instead of training on garbage: save the state (the weights before this step) and say where."""
        from minilm_sts.callbacks import save_emergency_checkpoint

        path = save_emergency_checkpoint(self.trainer, f"non-finite-loss-step{self.global_step}.ckpt")
        raise FloatingPointError(
            f"the training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, batch "
            f"{batch_idx}); the run stops here. The weights before this step are saved in {path}. Under fp16, try "
            "bf16-mixed or 32-true, or a lower learning rate."
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._scale_before_step = scaler.get_scale() if scaler is not None else None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Under fp16 loss scaling, GradScaler skips a step with inf/NaN gradients and lowers its scale: count them."""
        if self._scale_before_step is None:
            return
        if self.trainer.precision_plugin.scaler.get_scale() < self._scale_before_step:
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def on_train_start(self) -> None:
        """When resuming, continue the random stream (dropout) where the checkpoint left it, so a resumed run
        ends with the same weights as an uninterrupted one."""
        if self._resume_state:
            _set_rng_states(self._resume_state["rng"])
            self._loss_since_validation = [torch.tensor(x, device=self.device) for x in self._resume_state["loss_since_validation"]]
            self._resume_state = None

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "describe"):
            self.run_record["datasets"] = {split: datamodule.describe(split) for split in ("train", "val")}
            self.run_record["data"] = dict(datamodule.hparams)
        trainer = self.trainer
        self.run_record["trainer"] = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                                      "precision": trainer.precision, "val_check_interval": trainer.val_check_interval,
                                      "accumulate_grad_batches": trainer.accumulate_grad_batches}
        self.run_record["versions"] = framework_versions()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect_scores("val", dataloader_idx, batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect_scores("test", dataloader_idx, batch)

    def _collect_scores(self, stage: str, dataloader_idx: int, batch: dict) -> None:
        u, v = self._pair_embeddings(batch)
        cosine = F.cosine_similarity(u.float(), v.float(), dim=1)
        rows = [cosine.detach().double(), batch["labels"].double(), batch["indices"].double()]
        self._scores[(stage, dataloader_idx)].append(torch.stack(rows))

    def on_validation_epoch_end(self) -> None:
        values = self._log_correlations("val")
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        losses = self._loss_since_validation
        self._loss_since_validation = []
        epoch = self.current_epoch + (self.trainer.fit_loop.epoch_loop.batch_idx + 1) / max(1, self.trainer.num_training_batches)
        self.run_record["log"].append({"epoch": round(epoch, 4), "step": self.global_step,
                                       "training_loss": torch.stack(losses).mean().item() if losses else None, **values})

    def on_test_epoch_end(self) -> None:
        self.run_record["test"] = self._log_correlations("test")

    def _log_correlations(self, stage: str) -> dict[str, float]:
        """Pearson and Spearman per evaluation set over the whole split, logged as `<stage>/<metric>` for the
        first (monitored) set and, when there are several, `<stage>/<name>/<metric>` for each. The buffers are
        emptied every time, also after the sanity check, so its batches never leak into epoch 0."""
        datamodule = self.trainer.datamodule
        names = datamodule.eval_names(stage) if hasattr(datamodule, "eval_names") else [stage]
        logged, primary = {}, {}
        for index, name in enumerate(names):
            cosine, labels = self._gathered_scores(stage, index)
            values = correlations(cosine, labels)
            if index == 0:
                primary, self.last_scores[stage] = values, (cosine, labels)
                logged.update({f"{stage}/{metric}": value for metric, value in values.items()})
            if len(names) > 1:
                logged.update({f"{stage}/{name}/{metric}": value for metric, value in values.items()})
        self.log_dict(logged, prog_bar=len(names) == 1, add_dataloader_idx=False)
        return primary

    def _gathered_scores(self, stage: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine, label) over the whole evaluation set: gathered from every process, each pair once (the
        distributed sampler's padding repeats some), in pair order."""
        scores = torch.cat(self._scores.pop((stage, index)), dim=1)
        if self.trainer.world_size > 1:
            scores = self.all_gather(scores).transpose(0, 1).reshape(3, -1)
        scores = scores.cpu()
        _, first = np.unique(scores[2].numpy(), return_index=True)
        kept = scores[:, torch.from_numpy(first)]
        return kept[0], kept[1]

    # ----- optimisation ----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        h = self.hparams
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                exempt = not h.decay_bias_and_norm and (name.endswith(".bias") or "LayerNorm" in name)
                (no_decay if exempt else decay).append(param)
        groups = [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=h.lr, fused=h.fused_optimizer or None)
        total = self.trainer.estimated_stepping_batches
        warmup = math.ceil(h.warmup_ratio * total) if h.warmup_ratio is not None else h.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(h.scheduler, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip to `max_grad_norm`, also with a fused optimizer under 16-mixed.

        Lightning refuses its own clipping there because fused AdamW unscales fp16 gradients inside step(),
        so the norm it would see is still multiplied by the loss scale. We unscale first ourselves:
        GradScaler records that the optimizer is unscaled, then passes no scale to the fused step (and still
        skips the step on inf/NaN), so the clipped gradients are the true ones.
        """
        if gradient_clip_val:
            raise UserInputError("set --model.max_grad_norm instead of --trainer.gradient_clip_val")
        if not self.hparams.max_grad_norm:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and _optimizer_handles_unscaling(optimizer):
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.max_grad_norm)
        self.log("train/grad_norm", norm, batch_size=1)


def lr_multiplier(kind: str, warmup: int, total: int):
    """The learning-rate multiplier at optimizer step s: linear warmup over `warmup` steps, then linear decay to
    0 at step `total` (Hugging Face's get_linear_schedule_with_warmup) or constant."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return multiplier


def _rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def framework_versions() -> dict[str, str]:
    import platform

    import tokenizers
    import transformers

    from minilm_sts import __version__

    versions = {"Python": platform.python_version(), "minilm_sts": __version__, "Lightning": L.__version__,
                "Transformers": transformers.__version__, "PyTorch": torch.__version__, "Tokenizers": tokenizers.__version__}
    return {name: str(version) for name, version in versions.items()}  # plain str: checkpoints load weights_only


def upgrade_state_dict(state: dict) -> dict:
    """A checkpoint's state dict under today's keys, also when an earlier version wrote it."""
    return {(BERT_PREFIX + key.removeprefix(LEGACY_BERT_PREFIX) if key.startswith(LEGACY_BERT_PREFIX) else key): value
            for key, value in state.items()}


def embedder_state_dict(state: dict) -> dict:
    """The SentenceEncoder's own state dict, out of a checkpoint's."""
    return {key.removeprefix(EMBEDDER_PREFIX): value for key, value in upgrade_state_dict(state).items()
            if key.startswith(EMBEDDER_PREFIX)}
