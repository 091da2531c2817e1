"""SentenceEncoderTraining: the LightningModule that fine-tunes a SentenceEncoder with a pair loss (cosine-MSE by
default)."""

from __future__ import annotations

import functools
import warnings
from typing import Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F

from minilm_sts._compat import is_logging_step, optimizer_unscales_in_step
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.errors import UserInputError
from minilm_sts.evaluation.pair_scores import ScoredSet
from minilm_sts.model.bert import BertConfig, BertModel
from minilm_sts.model.checkpoint import TOKENIZER_CHECKPOINT_KEY, upgrade_state_dict
from minilm_sts.model.pretrained import DEFAULT_MODEL
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.model.tokenization import tokenizer_files, tokenizer_from_files
from minilm_sts.training.callbacks.evaluation import SplitEvaluation, ValidateBeforeTraining
from minilm_sts.training.callbacks.mixed_precision import SkippedStepCounter
from minilm_sts.training.callbacks.non_finite import NonFiniteLossGuard
from minilm_sts.training.callbacks.progress import loss_showing_bars
from minilm_sts.training.callbacks.resume import RandomStreamOnResume
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.gradient_cache import MiniBatchLayout, cached_loss, embed_in_pieces, whole_layout
from minilm_sts.training.guide import Guide
from minilm_sts.training.host_memory import reuse_freed_host_memory
from minilm_sts.training.losses import LOSSES, BoundLoss, build_losses, loss_of_set
from minilm_sts.training.optimization import adamw, step_schedule


class SentenceEncoderTraining(L.LightningModule):
    """Trains a SentenceEncoder (`self.sentence_encoder`, mean-pooled BERT) with a pair loss, by default cosine-MSE.

    `latest_evaluation[stage][set]` holds each evaluation set's latest scores, labels and metrics (a `ScoredSet`,
    the first set first): the one place where callbacks and users read what the last validation or test found.

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
        compile: run the BERT through `torch.compile` on a padded path (see SentenceEncoder). By default (None)
            it does on a GPU, where it trains 3x faster than the eager path (docs/benchmarks.md), and not on a
            CPU, where the packed eager path is faster.
        loss: the training loss, a name in `minilm_sts.training.losses.LOSSES`: cosine_mse, cosent, angle, mnrl or
            gist; or a mapping training set name: loss name, so that each set trains with its own (as
            sentence-transformers' Trainer takes a dict of losses), e.g. {"quora": "mnrl", "stsb": "cosent"}.
        loss_params: the loss's keyword parameters, e.g. {"scale": 20.0} or {"symmetric": True}; with a mapping
            `loss`, a mapping set name: parameters, e.g. {"quora": {"scale": 20.0}}. Checked here. gist's guide
            is `pretrained`, loaded at the first step that needs it.
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
        compile: Optional[bool] = None,
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
            self.sentence_encoder = SentenceEncoder.from_pretrained(pretrained, max_seq_length, bool(compile))
            self.hparams.encoder_config = self.sentence_encoder.bert.config.to_dict()
        else:  # from a checkpoint, which also holds the weights and the tokenizer
            bert = BertModel(BertConfig.from_dict(encoder_config))
            self.sentence_encoder = SentenceEncoder(bert, None, max_seq_length, bool(compile), pretrained)
        self.latest_evaluation: dict[str, dict[str, ScoredSet]] = {}
        self._latest_set_loss: dict[str, torch.Tensor] = {}  # each training set's last loss, on the device
        self._guide: Optional[Guide] = None  # gist's frozen guide, made when first needed; never a submodule
        # Made once, so that a test after a fit in the same trainer adds to the same run record.
        self._non_finite = NonFiniteLossGuard()
        self._callbacks = [SplitEvaluation(), RunRecord(), ValidateBeforeTraining(), RandomStreamOnResume(),
                           self._non_finite, SkippedStepCounter()]

    # ----- tokenizer and inference -----------------------------------------------------------------------------

    @property
    def embedder(self) -> SentenceEncoder:
        """Deprecated name of `sentence_encoder` (until 0.3)."""
        warnings.warn("SentenceEncoderTraining.embedder is now .sentence_encoder; the old name goes in 0.3",
                      DeprecationWarning, stacklevel=2)
        return self.sentence_encoder

    @property
    def tokenizer(self):
        """The sentence encoder's tokenizer, which the data module tokenizes with; checkpoints carry it."""
        return self.sentence_encoder.tokenizer

    @property
    def max_seq_length(self) -> int:
        """The data module truncates sentences to this many tokens."""
        return self.sentence_encoder.max_seq_length

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
            self.sentence_encoder.tokenizer = tokenizer_from_files(files)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of packed sentences (see SentenceEncoder.forward)."""
        return self.sentence_encoder(input_ids, lengths)

    def encode(self, *args, **kwargs) -> torch.Tensor:
        """The sentence encoder's `encode` (SentenceEncoder.encode), for a model loaded with load_from_checkpoint."""
        return self.sentence_encoder.encode(*args, **kwargs)

    # ----- steps -----------------------------------------------------------------------------------------------

    def _pair_embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._embeddings(batch).chunk(2)

    def _embeddings(self, batch: dict) -> torch.Tensor:
        """Every sentence of the batch, column after column."""
        return self.sentence_encoder(batch["input_ids"], batch["lengths"], whole_layout(batch.get("layout")))

    def _batch_layout(self):
        """What the loaders make each batch's layout with: the encoder's, and with a cached loss, mini-batches'
        too (build_losses allows one mini_batch_size per run)."""
        size = max(loss.mini_batch_size for loss in self._losses.values())
        layout = self.sentence_encoder.batch_layout
        return functools.partial(MiniBatchLayout, size=size, batch_layout=layout) if size else layout

    def configure_callbacks(self) -> list[L.Callback]:
        """What every run of this module has, from the command line or plain Lightning: whole-split evaluation,
        the run record for the model card, the random stream on resume, the non-finite loss guard, the count of
        fp16 steps skipped, and in place of Lightning's own progress bar one that shows the loss without a wait.
        A later stage of the same trainer (a test after a fit) finds them attached already.

        Lightning calls this as the trainer takes the module, before the data module's `setup`: so this is also
        where a PairDataModule is told how to tokenize (`tokenize_with`): with this module's tokenizer and max
        length unless it was given its own, always with the sets this module's losses want in-batch
        negatives for, and with the batch layout of the path chosen for the trainer's device."""
        if self.hparams.compile is None:
            self.sentence_encoder.use_compile = self.trainer.strategy.root_device.type == "cuda"
        data = self.trainer.datamodule
        if isinstance(data, PairDataModule):
            train_sets = list(data.sources["train"])
            losses = self.losses_for(train_sets) if train_sets else {}
            data.tokenize_with(data.tokenizer or self.tokenizer, data.max_seq_length or self.max_seq_length,
                               [name for name, loss in losses.items() if LOSSES[loss].in_batch_negatives],
                               self._batch_layout(), losses=losses)
        own = [callback for callback in self._callbacks if callback not in self.trainer.callbacks]
        return own + loss_showing_bars(self.trainer)

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":  # on a GPU the gradients live in device memory, which torch caches itself
            reuse_freed_host_memory()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The loss of one batch. Nothing here reads a value back from the device, which would make the host wait
        for the step to finish before it queues the next: the non-finite check stays on the device, and values
        are logged only at logging steps, where the loggers read them anyway."""
        per_set = None not in self._losses
        metrics: dict[str, torch.Tensor] = {}  # what the loss reports, such as its masked count
        loss = self._step_loss(self._losses[batch["train_set"] if per_set else None], batch, metrics)
        self._non_finite.record(loss, self.global_step, self.current_epoch, batch_idx)
        if per_set:  # kept on the device, so that a logging step shows every set, not only the one it drew
            self._latest_set_loss[batch["train_set"]] = loss.detach()
        if is_logging_step(self.trainer):
            rows = len(batch["labels"])
            self.log("train/loss", loss, batch_size=rows)
            for name, set_loss in self._latest_set_loss.items():  # kinds of loss differ in scale: one curve each
                self.log(f"train/{name}/loss", set_loss, batch_size=rows)
            for name, value in metrics.items():
                self.log(f"train/{name}", value.float(), batch_size=rows)
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=rows)
        return loss

    def _step_loss(self, loss: BoundLoss, batch: dict, metrics: dict) -> torch.Tensor:
        """`loss` of the batch's embeddings; with a mini_batch_size, by GradCache (the same value and gradients,
        with one mini-batch's activations alive at a time)."""
        columns = batch.get("columns", 2)
        if columns > 2 and "negatives" not in loss.inputs:
            raise UserInputError(f"the batch has {columns - 2} negative columns, but its loss takes pairs only; "
                                 "train rows with negatives with mnrl or gist")
        if not loss.mini_batch_size:
            guide = self._guide_embeddings(batch, [(batch["input_ids"], batch["lengths"], whole_layout(
                batch.get("layout")))]) if "guide" in loss.inputs else None
            return self._loss_of_embeddings(loss, self._embeddings(batch), guide, batch, metrics)
        layout = batch.get("layout")
        if not isinstance(layout, MiniBatchLayout):  # a batch made elsewhere: its sizes are read back here
            layout = MiniBatchLayout(batch["lengths"], loss.mini_batch_size, self.sentence_encoder.batch_layout)
        pieces = list(layout.pieces(batch["input_ids"], batch["lengths"]))
        guide = self._guide_embeddings(batch, pieces) if "guide" in loss.inputs else None
        return cached_loss(self.sentence_encoder, pieces,
                           lambda embeddings: self._loss_of_embeddings(loss, embeddings, guide, batch, metrics))

    @staticmethod
    def _loss_of_embeddings(loss: BoundLoss, embeddings: torch.Tensor, guide: Optional[torch.Tensor], batch: dict,
                            metrics: dict) -> torch.Tensor:
        """`loss` of the batch's column-major embeddings (anchors, positives, then any negative columns)."""
        rows = len(batch["labels"])
        return loss(embeddings[:rows], embeddings[rows : 2 * rows], batch["labels"],
                    negatives=embeddings[2 * rows :] if len(embeddings) > 2 * rows else None,
                    clusters=batch.get("clusters"), guide=guide, metrics=metrics)

    def _guide_embeddings(self, batch: dict, pieces: list[tuple]) -> torch.Tensor:
        """The frozen guide's embeddings of the batch (loaded from `pretrained` the first time), a mini-batch
        at a time."""
        if self._guide is None:
            self._guide = Guide(self.hparams.pretrained, self.max_seq_length)
        like = self.sentence_encoder.bert.embeddings.word_embeddings.weight
        return embed_in_pieces(functools.partial(self._guide.embeddings, like=like), pieces)

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
        if is_logging_step(self.trainer):
            self.log("train/grad_norm", norm, batch_size=1)


