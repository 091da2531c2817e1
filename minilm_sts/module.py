"""SentenceEmbedder: the LightningModule that fine-tunes a SentenceEncoder with a pair loss (cosine-MSE by default)."""

from __future__ import annotations

from typing import Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from minilm_sts.compat import optimizer_unscales_in_step
from minilm_sts.embedder import SentenceEncoder, tokenizer_files, tokenizer_from_files
from minilm_sts.encoder import BertConfig, BertModel
from minilm_sts.errors import UserInputError
from minilm_sts.host_memory import reuse_freed_host_memory
from minilm_sts.losses import build_losses, loss_of_set
from minilm_sts.module_callbacks import (
    NonFiniteLoss,
    NonFiniteLossCheckpoint,
    RandomStreamOnResume,
    RunRecord,
    SkippedStepCounter,
    SplitEvaluation,
    ValidateBeforeTraining,
)
from minilm_sts.optimization import adamw, step_schedule
from minilm_sts.pretrained import DEFAULT_MODEL

TOKENIZER_CHECKPOINT_KEY = "minilm_sts_tokenizer_files"
# The SentenceEncoder's weights in the state dict; checkpoints written before there was one (up to commit
# 3722055) hold its BERT under `encoder.`.
EMBEDDER_PREFIX, BERT_PREFIX, LEGACY_BERT_PREFIX = "embedder.", "embedder.bert.", "encoder."


class SentenceEmbedder(L.LightningModule):
    """Trains a SentenceEncoder (`self.embedder`, mean-pooled BERT) with a pair loss, by default cosine-MSE.

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
        loss: the training loss, a name in `minilm_sts.losses.LOSSES`: cosine_mse, cosent, angle or mnrl; or a
            mapping training set name: loss name, so that each set trains with its own (as sentence-transformers'
            Trainer takes a dict of losses), e.g. {"quora": "mnrl", "stsb": "cosent"}.
        loss_params: the loss's keyword parameters, e.g. {"scale": 20.0} or {"symmetric": True}; with a mapping
            `loss`, a mapping set name: parameters, e.g. {"quora": {"scale": 20.0}}. Checked here.
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
        loss: Union[str, dict[str, str]] = "cosine_mse",
        loss_params: Optional[dict] = None,
        encoder_config: Optional[dict] = None,
    ):
        super().__init__()
        if warmup_ratio is not None and warmup_steps:
            raise UserInputError("give warmup_steps or warmup_ratio, not both")
        self._losses = build_losses(loss, loss_params)  # a bad name or parameter stops here, before any training
        self.save_hyperparameters()
        if encoder_config is None:
            self.embedder = SentenceEncoder.from_pretrained(pretrained, max_seq_length, compile)
            self.hparams.encoder_config = self.embedder.bert.config.to_dict()
        else:  # from a checkpoint, which also holds the weights and the tokenizer
            bert = BertModel(BertConfig.from_dict(encoder_config))
            self.embedder = SentenceEncoder(bert, None, max_seq_length, compile, pretrained)
        # Made once, so that a test after a fit in the same trainer adds to the same run record.
        self._callbacks = [SplitEvaluation(), RunRecord(), ValidateBeforeTraining(), RandomStreamOnResume(),
                           NonFiniteLossCheckpoint(), SkippedStepCounter()]

    # ----- tokenizer and inference -----------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The embedder's tokenizer, which the data module tokenizes with; checkpoints carry it."""
        return self.embedder.tokenizer

    @property
    def max_seq_length(self) -> int:
        """The data module truncates sentences to this many tokens."""
        return self.embedder.max_seq_length

    def losses_for(self, train_sets: list[str]) -> dict[str, str]:
        """The loss name each training set trains with, so the data module can prepare each set for its loss. A
        mapping `loss` must name exactly these sets."""
        loss = self.hparams.loss
        if not isinstance(loss, str) and sorted(loss) != sorted(train_sets):
            raise UserInputError(f"loss names the training sets {list(loss)}, but they are {train_sets}; "
                                 "give one loss for every set, or a loss for each set by name")
        return {name: loss_of_set(loss, None, name)[0] for name in train_sets}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_CHECKPOINT_KEY] = tokenizer_files(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
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

    def configure_callbacks(self) -> list[L.Callback]:
        """What every run of this module has, from the command line or plain Lightning: whole-split evaluation,
        the run record for the model card, the random stream on resume, a checkpoint on a non-finite loss and
        the count of fp16 steps skipped. A later stage of the same trainer (a test after a fit) finds them
        attached already."""
        return [callback for callback in self._callbacks if callback not in self.trainer.callbacks]

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":  # on a GPU the gradients live in device memory, which torch caches itself
            reuse_freed_host_memory()
        elif self.device.type == "cuda" and not self.hparams.compile:
            rank_zero_warn("on a GPU, --model.compile true (SentenceEmbedder(compile=True)) trains faster: 2.1x "
                           "sentence-transformers' Trainer end to end against 0.7x without it, on an H200 with "
                           "the seed recipe (docs/benchmarks.md)")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        u, v = self._pair_embeddings(batch)
        per_set = None not in self._losses
        loss = self._losses[batch["train_set"] if per_set else None](u, v, batch["labels"])
        if not torch.isfinite(loss):  # stop rather than train on garbage; NonFiniteLossCheckpoint saves the state
            raise NonFiniteLoss(loss.item(), self.global_step, self.current_epoch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(u))
        if per_set:  # losses of different kinds have different scales: each set's own curve says more
            self.log(f"train/{batch['train_set']}/loss", loss, batch_size=len(u))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=len(u))
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The cosine of each pair; SplitEvaluation scores the whole split from these."""
        u, v = self._pair_embeddings(batch)
        return F.cosine_similarity(u.float(), v.float(), dim=1)

    test_step = validation_step

    # ----- optimisation ----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        h = self.hparams
        optimizer = adamw(self.named_parameters(), h.lr, h.weight_decay, h.decay_bias_and_norm, h.fused_optimizer)
        schedule = step_schedule(optimizer, h.scheduler, h.warmup_steps, h.warmup_ratio,
                                 self.trainer.estimated_stepping_batches)
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
        if scaler is not None and optimizer_unscales_in_step(optimizer):
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.max_grad_norm)
        self.log("train/grad_norm", norm, batch_size=1)


def upgrade_state_dict(state: dict) -> dict:
    """A checkpoint's state dict under today's keys, also when an earlier version wrote it."""
    return {(BERT_PREFIX + key.removeprefix(LEGACY_BERT_PREFIX) if key.startswith(LEGACY_BERT_PREFIX) else key): value
            for key, value in state.items()}


def embedder_state_dict(state: dict) -> dict:
    """The SentenceEncoder's own state dict, out of a checkpoint's."""
    return {key.removeprefix(EMBEDDER_PREFIX): value for key, value in upgrade_state_dict(state).items()
            if key.startswith(EMBEDDER_PREFIX)}
