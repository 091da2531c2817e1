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
    of a dataset that has them (`distinct_sentence_batches`), as losses with in-batch negatives need.
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
        self._planned: Optional[tuple[int, list[list[int]]]] = None  # (epoch, its plan), made once per epoch
        receive_set_epoch(self)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._skip = epoch, 0

    def __len__(self) -> int:
        return math.ceil(len(self._epoch_plan()) / self.world)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        plan = list(self._epoch_plan())
        plan += plan[: len(self) * self.world - len(plan)]
        return iter(plan[self.rank :: self.world][skip:])

    def _epoch_plan(self) -> list[list[int]]:
        if self._planned is None or self._planned[0] != self.epoch:
            self._planned = (self.epoch, self._plan())
        return self._planned[1]

    def _plan(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        per_dataset, offset = [], 0
        for dataset, size in enumerate(self.sizes):
            order = torch.randperm(size, generator=generator).tolist()
            if self.sentence_ids is None or self.sentence_ids[dataset] is None:
                batches = [order[i : i + self.batch_size] for i in range(0, size, self.batch_size)]
            else:
                batches = distinct_sentence_batches(order, self.sentence_ids[dataset], self.batch_size)
            per_dataset.append([[offset + i for i in batch] for batch in batches])
            offset += size
        if len(per_dataset) == 1:
            return per_dataset[0]
        if self.mode == "round_robin":
            rounds = min(len(batches) for batches in per_dataset)
            return [batches[i] for i in range(rounds) for batches in per_dataset]
        remaining = torch.tensor([len(batches) for batches in per_dataset], dtype=torch.float64)
        plan = []
        while remaining.sum() > 0:
            chosen = int(torch.multinomial(remaining, 1, generator=generator))
            plan.append(per_dataset[chosen][len(per_dataset[chosen]) - int(remaining[chosen])])
            remaining[chosen] -= 1
        return plan

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state["batches_done"]


def distinct_sentence_batches(order: list[int], sentence_ids: np.ndarray, batch_size: int) -> list[list[int]]:
    """`order` in batches of `batch_size` rows (at least 2) where no sentence occurs twice: batches are filled
    in order, and a row whose sentence is already in the batch waits for the next one, which takes waiting rows
    first. A row still alone at the end joins the first batch holding neither of its sentences (one row over
    `batch_size`); if none can take it, it sits this epoch out, named in one warning for the epoch."""
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
    # Each full batch's sentences, gathered once: lone rows are few, but each one may scan every batch.
    taken = [set(sentence_ids[batch].ravel().tolist()) for batch in full]
    alone = [batch[0] for batch in batches if len(batch) == 1]
    left_out = [row for row in alone if not _place_alone(row, full, taken, sentence_ids)]
    if left_out:
        shown = ", ".join(map(str, left_out[:10])) + (", ..." if len(left_out) > 10 else "")
        warnings.warn(f"{len(left_out)} training pair(s) share a sentence with every batch of this epoch and sit it "
                      f"out: row(s) {shown}")
    return full


def _place_alone(row: int, batches: list[list[int]], taken: list[set[int]], sentence_ids: np.ndarray) -> bool:
    """Adds `row` to the first batch holding neither of its sentences; False if there is none."""
    sentences = set(sentence_ids[row].tolist())
    for batch, batch_sentences in zip(batches, taken):
        if not sentences & batch_sentences:
            batch.append(row)
            batch_sentences |= sentences
            return True
    return False
