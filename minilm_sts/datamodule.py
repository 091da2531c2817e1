"""LightningDataModule for labelled sentence pairs: tokenized once, cached, padded per batch."""

from __future__ import annotations

import math
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from minilm_sts.pairs import PairDataError
from minilm_sts.tokenized import TokenizedPairs, load_tokenized


class PairDataset(Dataset):
    """Index i is pair i; `collate` turns a list of indices into one padded batch of both columns."""

    def __init__(self, pairs: TokenizedPairs, pad_token_id: int = 0):
        self.pairs = pairs
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows 0..B-1 hold sentence A of each pair and rows B..2B-1 sentence B, so one encoder call embeds
        both columns; the batch is padded to its longest sentence."""
        rows = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        sentences = [self.pairs.sentence(k) for k in rows]
        width = max(len(s) for s in sentences)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, ids in enumerate(sentences):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(np.asarray(self.pairs.labels[indices], dtype=np.float32)),
        }


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch), resumable in the middle of an epoch.

    `batches_done` reports how many of this epoch's batches the trainer has trained on. Lightning stores it in
    the checkpoint (through the loader's state_dict), and the first pass after a resume skips those batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, batches_done: Callable[[], int]):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.batches_done = batches_done
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        skip, self._skip = self._skip, 0
        return iter(order[skip * self.batch_size :].tolist())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["batches_done"]


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's resumable-loader interface, delegating to its shuffle's state.

    Lightning restores a loader's state only if it builds the loader after restoring its loops, but
    `configure_optimizers` asks for `estimated_stepping_batches`, which builds it earlier. So PairDataModule's
    own state_dict carries the same state too, and restoring it twice is harmless.
    """

    def state_dict(self) -> dict:
        return self.batch_sampler.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.sampler.load_state_dict(state)


CARD_STATS_ROWS = 1000  # sentence-transformers <= 5.4 describe a dataset by its first 1000 rows


def summary_stats(values: np.ndarray) -> dict:
    return {"min": float(values.min()), "mean": round(float(values.mean()), 2), "max": float(values.max())}


class PairDataModule(L.LightningDataModule):
    """Sentence pairs with a similarity label in [0, 1] (after dividing by `label_scale`).

    Args:
        train_path, val_path, test_path: a `.csv`, `.tsv`, `.jsonl` or `.parquet` file, `builtin:stsb/SPLIT`
            for the packaged STS Benchmark, or `hf:NAME[:CONFIG]:SPLIT` for a Hugging Face dataset.
        sentence_columns: the two text columns; by default `sentence_0, sentence_1` or `sentence1, sentence2`.
        label_column: by default `label` or `score`.
        label_scale: labels are divided by this (5.0 for raw STS-B scores 0-5).
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle.
    """

    def __init__(
        self,
        train_path: Optional[str] = "builtin:stsb/train",
        val_path: Optional[str] = "builtin:stsb/dev",
        test_path: Optional[str] = "builtin:stsb/test",
        sentence_columns: Optional[list[str]] = None,
        label_column: Optional[str] = None,
        label_scale: float = 1.0,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        self.max_seq_length: Optional[int] = None
        self.datasets: dict[str, PairDataset] = {}
        self._train_shuffle: Optional[EpochShuffle] = None
        self._shuffle_state: Optional[dict] = None  # from a checkpoint, for the next train loader

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:  # the model owns the tokenizer and the max length
            model = self.trainer.lightning_module
            self.tokenizer, self.max_seq_length = model.tokenizer, model.hparams.max_seq_length
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self._load(split)

    def _load(self, split: str) -> PairDataset:
        source = getattr(self.hparams, f"{split}_path")
        if source is None:
            raise PairDataError(f"no {split} data: set --data.{split}_path")
        h = self.hparams
        pairs = load_tokenized(source, self.tokenizer, self.max_seq_length, h.sentence_columns, h.label_column, h.label_scale)
        if split != "train":
            _check_correlation_defined(source, pairs)
        return PairDataset(pairs, self.tokenizer.pad_token_id)

    def describe(self, split: str) -> dict:
        """What a model card says about a split: size, columns, tokens per sentence (special tokens included,
        after truncation) and label statistics over the first 1000 pairs, and the first rows."""
        pairs = self.datasets[split].pairs
        rows = min(len(pairs), CARD_STATS_ROWS)
        lengths = np.diff(pairs.offsets[: 2 * rows + 1])
        column_a, column_b, label = pairs.columns
        return {
            "source": getattr(self.hparams, f"{split}_path"),
            "size": len(pairs),
            "stats_rows": rows,
            "columns": list(pairs.columns),
            "tokens": {column_a: summary_stats(lengths[0::2]), column_b: summary_stats(lengths[1::2])},
            "label": {label: summary_stats(pairs.labels[:rows])},
            "samples": [list(row) for row in pairs.samples],
            "at_max_length": pairs.at_max_length,
        }

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        shuffle = EpochShuffle(len(dataset), self.hparams.batch_size, self.hparams.seed, self._batches_trained)
        if self._shuffle_state is not None:
            shuffle.load_state_dict(self._shuffle_state)
            self._shuffle_state = None
        self._train_shuffle = shuffle
        return self._loader(ResumableLoader, dataset, batch_sampler=BatchSampler(shuffle, self.hparams.batch_size, False))

    def val_dataloader(self) -> DataLoader:
        return self._loader(DataLoader, self.datasets["val"], batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(DataLoader, self.datasets["test"], batch_size=self.hparams.batch_size)

    def _loader(self, loader_class: type, dataset: PairDataset, **kwargs) -> DataLoader:
        # Each loader gets its own generator: creating an iterator then never draws from the global RNG, so
        # dropout sees the same random stream with or without validation runs and across a resume.
        workers = self.hparams.num_workers
        return loader_class(dataset, collate_fn=dataset.collate, num_workers=workers, persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(self.hparams.seed), **kwargs)

    def state_dict(self) -> dict:
        return {"train_shuffle": self._train_shuffle.state_dict()} if self._train_shuffle else {}

    def load_state_dict(self, state: dict) -> None:
        self._shuffle_state = state.get("train_shuffle")

    def _batches_trained(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed


def _check_correlation_defined(source: str, pairs: TokenizedPairs) -> None:
    """Pearson and Spearman need at least two rows and two distinct labels."""
    if len(pairs) < 2:
        raise PairDataError(f"{source}: an evaluation set needs at least 2 pairs, got {len(pairs)}")
    if np.all(pairs.labels == pairs.labels[0]):
        raise PairDataError(
            f"{source}: every label equals {float(pairs.labels[0]):g}, so the correlation of cosine with label is "
            "undefined; an evaluation set needs at least two distinct labels"
        )
