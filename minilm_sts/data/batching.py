"""Training batches: which pairs go together in each batch of an epoch, planned from (seed, epoch) alone so that a
resumed run continues the same plan, shared out among distributed processes, and for losses with in-batch
negatives without a sentence twice in a batch."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch

from minilm_sts._compat import receive_set_epoch


class PairBatches:
    """Training batches for one epoch: shuffled with (seed, epoch) alone, each batch from one dataset.

    With several datasets, `round_robin` takes one batch from each in turn and stops when the smallest runs
    out (sentence-transformers' round-robin sampler); `proportional` visits every batch of every dataset,
    picking the next dataset at random in proportion to its remaining batches. `batches_done` reports how many
    of this epoch's batches the trainer has trained on: saved in checkpoints, it makes the first pass after a
    resume skip exactly those. Under distributed training, process `rank` of `world` takes every world-th batch
    of the same plan, which is first padded by repeating its start so that every process gets as many.
    With `sentence_ids` (per dataset, `PairDataset.sentence_ids()` or None), no sentence occurs twice in a batch
    of a dataset that has them, in any of its columns, negatives included (`distinct_sentence_batches`), as losses
    with in-batch negatives need.
    """

    def __init__(self, sizes: list[int], batch_size: int, seed: int, mode: str, batches_done: Callable[[], int],
                 rank: int = 0, world: int = 1, sentence_ids: Optional[list[np.ndarray]] = None):
        if mode not in ("round_robin", "proportional"):
            raise ValueError(f"multi_dataset_sampler must be round_robin or proportional, got {mode!r}")
        self.sizes, self.batch_size, self.seed, self.mode = sizes, batch_size, seed, mode
        self.batches_done = batches_done
        self.rank, self.world = rank, world
        self.sentence_ids = sentence_ids
        self.epoch, self._skip = 0, 0
        self._planned: Optional[tuple[int, EpochPlan]] = None  # (epoch, its plan), made once per epoch
        receive_set_epoch(self)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def __len__(self) -> int:
        return math.ceil(len(self._epoch_plan()) / self.world)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        plan = self._epoch_plan()
        # Process `rank` takes planned batches rank, rank + world, ...; past the end the plan starts again.
        for position in range(self.rank + skip * self.world, len(self) * self.world, self.world):
            yield plan.batch(position % len(plan))

    def _epoch_plan(self) -> "EpochPlan":
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = (self.epoch, self._plan())
        return self._planned[1]

    def _plan(self) -> "EpochPlan":
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        rows, bounds = [], []
        for dataset, size in enumerate(self.sizes):
            # int32 (the same permutation as int64 for the same generator) halves the plan for any usual size.
            order = torch.randperm(size, generator=generator, dtype=_row_type(size)).numpy()
            if self.sentence_ids is None or self.sentence_ids[dataset] is None:
                rows.append(order)
                bounds.append(np.append(np.arange(0, size, self.batch_size), size))
            else:
                batches = distinct_sentence_batches(order.tolist(), self.sentence_ids[dataset], self.batch_size)
                rows.append(np.fromiter((row for batch in batches for row in batch), dtype=order.dtype))
                bounds.append(np.cumsum([0] + [len(batch) for batch in batches]))
        counts = [len(b) - 1 for b in bounds]
        if len(counts) == 1:
            sequence = np.stack([np.zeros(counts[0], dtype=np.int64), np.arange(counts[0])], axis=1)
        elif self.mode == "round_robin":
            rounds = min(counts)
            sequence = np.array([(d, i) for i in range(rounds) for d in range(len(counts))], dtype=np.int64)
        else:
            remaining = torch.tensor(counts, dtype=torch.float64)
            sequence = []
            while remaining.sum() > 0:
                chosen = int(torch.multinomial(remaining, 1, generator=generator))
                sequence.append((chosen, counts[chosen] - int(remaining[chosen])))
                remaining[chosen] -= 1
            sequence = np.array(sequence, dtype=np.int64).reshape(-1, 2)
        return EpochPlan(rows, bounds, np.cumsum([0] + self.sizes[:-1]), sequence)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["batches_done"]


def _row_type(size: int) -> torch.dtype:
    return torch.int32 if size < 2**31 else torch.int64


class EpochPlan:
    """An epoch's batches, compactly: per dataset its rows in batch order and where each batch starts there,
    and the epoch's sequence of (dataset, batch) pairs. About 4 bytes a pair, where lists of Python ints took
    ten times that."""

    def __init__(self, rows: list[np.ndarray], bounds: list[np.ndarray], offsets: np.ndarray, sequence: np.ndarray):
        self.rows, self.bounds, self.offsets, self.sequence = rows, bounds, offsets, sequence

    def __len__(self) -> int:
        return len(self.sequence)

    def batch(self, position: int) -> list[int]:
        """The global indices (dataset offset + row) of the epoch's batch at `position`."""
        dataset, index = self.sequence[position]
        start, stop = self.bounds[dataset][index], self.bounds[dataset][index + 1]
        return (int(self.offsets[dataset]) + self.rows[dataset][start:stop].astype(np.int64)).tolist()


def distinct_sentence_batches(order: list[int], sentence_ids: np.ndarray, batch_size: int) -> list[list[int]]:
    """`order` in batches of `batch_size` rows (at least 2) where no sentence occurs twice: `sentence_ids[row]`
    holds each of the row's sentences (a pair's two, or an anchor's, its positive's and its negatives', as
    sentence-transformers' NoDuplicatesBatchSampler checks every column). Batches are filled in order, and a row
    with a sentence already in the batch waits for the next one, which takes waiting rows first. A row still
    alone at the end joins the first batch holding none of its sentences (one row over `batch_size`); if none
    can take it, it sits this epoch out, named in one warning for the epoch."""
    batches, waiting, position = [], [], 0
    while waiting or position < len(order):
        batch, seen, deferred = [], set(), []
        candidates = iter(waiting)
        while len(batch) < batch_size:
            row = next(candidates, None)
            if row is None:
                if position == len(order):
                    break
                row, position = order[position], position + 1
            sentences = set(sentence_ids[row].tolist())
            if seen & sentences:
                deferred.append(row)
            else:
                batch.append(row)
                seen |= sentences
        waiting = deferred + list(candidates)
        batches.append(batch)
    full = [batch for batch in batches if len(batch) > 1]
    alone = [batch[0] for batch in batches if len(batch) == 1]
    # Each full batch's sentences, gathered once (and only if a row is alone): lone rows are few, but each one
    # may scan every batch.
    taken = [set(sentence_ids[batch].ravel().tolist()) for batch in full] if alone else []
    left_out = [row for row in alone if not _place_alone(row, full, taken, sentence_ids)]
    if left_out:
        shown = ", ".join(map(str, left_out[:10])) + (", ..." if len(left_out) > 10 else "")
        warnings.warn(f"{len(left_out)} training pair(s) share a sentence with every batch of this epoch and sit it "
                      f"out: row(s) {shown}")
    return full


def _place_alone(row: int, batches: list[list[int]], taken: list[set[int]], sentence_ids: np.ndarray) -> bool:
    """Adds `row` to the first batch holding none of its sentences; False if there is none."""
    sentences = set(sentence_ids[row].tolist())
    for batch, batch_sentences in zip(batches, taken):
        if not sentences & batch_sentences:
            batch.append(row)
            batch_sentences |= sentences
            return True
    return False
