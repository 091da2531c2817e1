"""SentenceEmbedder: the LightningModule that fine-tunes a BERT sentence embedder with cosine-MSE."""

from __future__ import annotations

import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from minilm_sts.compat import optimizer_unscales_in_step
from minilm_sts.encoder import BertConfig, BertEncoder, PackedLayout, PaddedLayout, padded_from_packed
from minilm_sts.errors import MissingInputError, UserInputError
from minilm_sts.pretrained import DEFAULT_MODEL, resolve_pretrained
from minilm_sts.losses import cosine_mse_loss
from minilm_sts.module_callbacks import (NonFiniteLoss, NonFiniteLossCheckpoint, RandomStreamOnResume, RunRecord,
                                         SkippedStepCounter, SplitEvaluation)
from minilm_sts.tokenized import tokenize_texts

TOKENIZER_CHECKPOINT_KEY = "minilm_sts_tokenizer_files"
# Under `compile`, batch widths are rounded up to this: at most 8 distinct widths up to 128 tokens, so compiled
# code and CUDA graphs are reused instead of rebuilt for every new longest sentence.
COMPILED_WIDTH_MULTIPLE = 16
# Encode runs at most this many batches at once: each holds Python's lock between its operators, so many more
# workers would queue on it rather than compute.
MAX_ENCODE_WORKERS = 8


class SentenceEmbedder(L.LightningModule):
    """Mean-pooled BERT sentence embeddings trained so that cos(u, v) regresses the pair's label.

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
        compile: run the encoder through `torch.compile` (CUDA graphs on a GPU). Compiled graphs want few
            shapes, so this path pads each batch to a width rounded up to a multiple of 16 tokens instead of
            packing it; it pays where launch overhead dominates (a GPU at batch 32), not on a CPU.
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
            folder = resolve_pretrained(pretrained)
            self.encoder = BertEncoder(BertConfig.from_folder(folder))
            self.encoder.load_safetensors(folder / "model.safetensors")
            self.hparams.encoder_config = self.encoder.config.to_dict()
        else:
            self.encoder = BertEncoder(BertConfig.from_dict(encoder_config))
        if max_seq_length > self.encoder.config.max_position_embeddings:
            raise UserInputError(f"max_seq_length {max_seq_length} exceeds the model's "
                                 f"{self.encoder.config.max_position_embeddings} position embeddings")
        self._tokenizer = None
        self._compiled_embeddings = None  # built on first use, once the device is known
        # Made once, so that a test after a fit in the same trainer adds to the same run record.
        self._callbacks = [SplitEvaluation(), RunRecord(), RandomStreamOnResume(), NonFiniteLossCheckpoint(),
                           SkippedStepCounter()]

    # ----- tokenizer -------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The model folder's fast tokenizer; restored from the checkpoint when loaded from one."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(resolve_pretrained(self.hparams.pretrained)))
        return self._tokenizer

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            self.tokenizer.save_pretrained(folder)
            checkpoint[TOKENIZER_CHECKPOINT_KEY] = {p.name: p.read_text() for p in Path(folder).iterdir() if p.is_file()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        files = checkpoint.get(TOKENIZER_CHECKPOINT_KEY)
        if files:
            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as folder:
                for name, text in files.items():
                    (Path(folder) / name).write_text(text)
                self._tokenizer = AutoTokenizer.from_pretrained(folder)

    # ----- embedding -------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, unnormalised sentence embeddings (the cosine loss is scale-invariant) of packed sentences:
        `input_ids` holds their token ids end to end, `lengths` how many belong to each."""
        if not self.hparams.compile:
            return self.encoder.sentence_embeddings(input_ids, PackedLayout(lengths))
        ids, mask = padded_from_packed(input_ids, lengths, COMPILED_WIDTH_MULTIPLE)
        if ids.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # earlier calls' outputs are consumed by now
        return self._compiled(ids.device)(ids, mask)

    def _compiled(self, device: torch.device):
        if self._compiled_embeddings is None:
            # On a GPU a step of this small model is mostly kernel launches: CUDA graphs replay them at once.
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            if device.type == "cpu":
                rank_zero_warn("compile=True on a CPU trains slower than the default packed path (docs/benchmarks.md): "
                               "it pads batches and spends a minute compiling; it is meant for GPUs")
            self._compiled_embeddings = torch.compile(self._padded_embeddings, mode=mode)
        return self._compiled_embeddings

    def _padded_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.sentence_embeddings(input_ids, PaddedLayout(attention_mask))

    def tokenize(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Packed token ids ([CLS] ... [SEP], truncated at max_seq_length) and the length of each sentence."""
        ids, offsets, _ = tokenize_texts(self.tokenizer, sentences, self.hparams.max_seq_length)
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "lengths": torch.from_numpy(np.diff(offsets))}

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], batch_size: int = 32, normalize: bool = True,
               device: Optional[str | torch.device] = None, show_progress: bool = False) -> torch.Tensor:
        """Embeddings (N, D) in input order, float32 on the CPU. Sentences are batched by token length so each
        batch's attention pads little; the order is restored afterwards."""
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences; wrap a single sentence in a list")
        if device is not None:
            self.to(device)
        was_training = self.training
        self.eval()
        # One tokenizer call for everything, then batches of similar token length, longest first.
        tokens = self.tokenize(sentences)
        ids, lengths = tokens["input_ids"], tokens["lengths"]
        offsets = torch.cumsum(lengths, 0) - lengths
        batches = torch.split(torch.argsort(-lengths, stable=True), batch_size)
        # Grad mode and autocast are per thread: worker threads take the caller's.
        device_type = self.device.type
        autocast_dtype, autocast_on = torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)

        def embed(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                input_ids = torch.cat([ids[offsets[i] : offsets[i] + lengths[i]] for i in chunk.tolist()])
                embeddings = self(input_ids.to(self.device), lengths[chunk].to(self.device)).float()
                return (F.normalize(embeddings, p=2, dim=1) if normalize else embeddings).cpu()

        results = self._map_batches(embed, batches)
        if show_progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(batches), desc="Encoding", unit="batch")
        out = torch.empty(len(sentences), self.encoder.config.hidden_size)
        try:
            # strict: after the last batch, zip asks `results` for one more, which ends the progress bar at 100%.
            for chunk, embeddings in zip(batches, results, strict=True):
                out[chunk] = embeddings
        finally:
            self.train(was_training)
        return out

    def _map_batches(self, embed, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`embed` of each batch, in order. On a CPU, several batches run at once, each on its share of the
        threads: an inference batch's matrix products are small, and splitting each across all cores costs more
        in synchronisation than running whole batches side by side (11% faster on this project's 2 cores)."""
        threads = torch.get_num_threads()
        workers = min(threads, MAX_ENCODE_WORKERS)
        if self.device.type != "cpu" or workers == 1 or self.hparams.compile:  # compiled code is not thread-safe
            yield from map(embed, batches)
            return
        try:
            # Under OpenMP (Linux, Windows) the thread count is per thread; the finally covers other backends.
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads // workers,)) as pool:
                yield from pool.map(embed, batches)
        finally:
            torch.set_num_threads(threads)

    # ----- steps -----------------------------------------------------------------------------------------------

    def _pair_embeddings(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"], batch["lengths"]).chunk(2)

    def configure_callbacks(self) -> list[L.Callback]:
        """What every run of this module has, from the command line or plain Lightning: whole-split evaluation,
        the run record for the model card, the random stream on resume, a checkpoint on a non-finite loss and
        the count of fp16 steps skipped. A later stage of the same trainer (a test after a fit) finds them
        attached already."""
        return [callback for callback in self._callbacks if callback not in self.trainer.callbacks]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        u, v = self._pair_embeddings(batch)
        loss = cosine_mse_loss(u, v, batch["labels"])
        if not torch.isfinite(loss):  # stop rather than train on garbage; NonFiniteLossCheckpoint saves the state
            raise NonFiniteLoss(loss.item(), self.global_step, self.current_epoch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(u))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=len(u))
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The cosine of each pair; SplitEvaluation scores the whole split from these."""
        u, v = self._pair_embeddings(batch)
        return F.cosine_similarity(u.float(), v.float(), dim=1)

    test_step = validation_step

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix (len(a), len(b)) between two sets of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

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
        if scaler is not None and optimizer_unscales_in_step(optimizer):
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


def check_checkpoint(path: Path) -> None:
    """Fail with a plain message on a missing or damaged file or a checkpoint of some other model."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such checkpoint file")
    try:
        # mmap: the check reads the archive's structure and plain values; load_from_checkpoint reads the tensors.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or non-checkpoint files
        raise UserInputError(f"{path}: not a readable checkpoint, perhaps truncated or corrupt ({err})") from err
    if "encoder_config" not in checkpoint.get("hyper_parameters", {}):
        raise UserInputError(f"{path}: this checkpoint was not written by minilm_sts's SentenceEmbedder")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> SentenceEmbedder:
    """A model ready to `encode`, from a Lightning checkpoint (.ckpt) or an exported / sentence-transformers folder."""
    from minilm_sts.export import read_max_seq_length

    path = Path(path)
    if path.is_file():
        check_checkpoint(path)
        return SentenceEmbedder.load_from_checkpoint(path, map_location=map_location).eval()
    if path.is_dir():
        max_seq_length = read_max_seq_length(path) or 128
        return SentenceEmbedder(pretrained=str(path), max_seq_length=max_seq_length).to(map_location).eval()
    raise MissingInputError(f"{path}: no such checkpoint file or model folder")
