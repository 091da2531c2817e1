"""The datasets and loader a PairDataModule serves: one tokenized pair set (with its collate into packed
batches), several sets as one, and a loader whose batch plan resumes mid-epoch."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.utils.data import DataLoader, Dataset

from minilm_sts.data.token_cache import TokenizedPairs
from minilm_sts.model.bert import PackedLayout

RELEASE_EVERY = 16  # batches: at most about 16 x 128 reads (ids, offsets) x 64 KB = 128 MB of cache pages mapped


class PairDataset(Dataset):
    """Index i is row `rows[i]` of `pairs` (every row by default): a pair, or an anchor, a positive and negatives;
    `collate` turns a list of indices into one packed batch of every column."""

    def __init__(self, pairs: TokenizedPairs, rows: Optional[np.ndarray] = None):
        self.pairs = pairs
        self.rows = np.arange(len(pairs), dtype=np.int32 if len(pairs) < 2**31 else np.int64) if rows is None else rows
        self.batches_made = 0  # in this process: every RELEASE_EVERY batches, the cache pages read are let go
        self.clusters: Optional[np.ndarray] = None  # [len(self), columns] duplicate cluster ids, once marked

    def mark_duplicates(self, sentence_ids: np.ndarray) -> None:
        """From now on batches carry each sentence's duplicate cluster (`clusters`), from `self.sentence_ids()`."""
        self.clusters = duplicate_clusters(sentence_ids)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int], batch_layout: Callable = PackedLayout) -> dict[str, torch.Tensor | int]:
        """Column by column: sentence A (the anchor) of each row, then sentence B (the positive) of each, then
        each negative column's, packed end to end with no padding. One encoder call embeds them all; `columns`
        says how many columns there are, `lengths` where each sentence ends, and `layout` is the encoder's
        bookkeeping for them (its `batch_layout`), made here in the loader so that the training step never waits
        on it. Once duplicates are marked, `clusters` gives each sentence's cluster, in the same order."""
        self.batches_made += 1
        if self.batches_made % RELEASE_EVERY == 0:
            self.pairs.release_pages()  # resident memory stays bounded over an epoch of a large cache entry
        pair_rows = self.rows[indices].astype(np.int64)
        columns = self.pairs.columns
        tokens, sizes = sentence_tokens(self.pairs, (columns * pair_rows + np.arange(columns)[:, None]).ravel())
        lengths = torch.from_numpy(sizes)
        batch = {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "lengths": lengths,
            "layout": batch_layout(lengths),
            "labels": torch.from_numpy(np.asarray(self.pairs.labels[pair_rows], dtype=np.float32)),
            "indices": torch.tensor(indices),
            "columns": columns,
        }
        if self.clusters is not None:
            batch["clusters"] = torch.from_numpy(self.clusters[indices].T.astype(np.int64).ravel())
        return batch

    def sentence_ids(self, block: int = 1 << 18) -> np.ndarray:
        """[len(self), columns]: a 64-bit hash of the token ids of each sentence of each row: what the model sees,
        so two texts that tokenize alike count as one. Hashed, as sentence-transformers' NO_DUPLICATES_HASHED
        batches do, so that the ids of 100M pairs take 16 bytes a pair, computed `block` sentences at a time; a
        collision (about 2^-64 for two sentences) would only make a row wait for the next batch."""
        columns = self.pairs.columns
        sentences = (columns * self.rows.astype(np.int64)[:, None] + np.arange(columns)).ravel()
        hashes = np.empty(len(sentences), dtype=np.uint64)
        for start in range(0, len(sentences), block):
            tokens, sizes = sentence_tokens(self.pairs, sentences[start : start + block])
            hashes[start : start + block] = _hash_token_runs(tokens, sizes)
        return hashes.view(np.int64).reshape(-1, columns)


def duplicate_clusters(sentence_ids: np.ndarray) -> np.ndarray:
    """[rows, columns] sentence ids (hashes) -> the same shape of cluster ids: two sentences share one exactly
    when the rows' first two sentences (each a positive pair) link them, directly or through others, i.e. the
    connected components of the positive pairs' graph. A negative that is a known duplicate of its anchor thus
    has the anchor's cluster; any other sentence that is in no positive pair has a cluster of its own. Plain
    arrays and scipy's components throughout: a few bytes per sentence, no Python object per sentence."""
    distinct, sentence = np.unique(sentence_ids, return_inverse=True)
    sentence = sentence.reshape(sentence_ids.shape)
    edges = np.ones(len(sentence), dtype=np.int8)
    graph = coo_matrix((edges, (sentence[:, 0], sentence[:, 1])), shape=(len(distinct), len(distinct)))
    _, component = connected_components(graph, directed=False)
    return component[sentence]


def sentence_tokens(pairs: TokenizedPairs, sentences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of the given sentences end to end, in one gather, and each sentence's length."""
    starts = pairs.offsets[sentences].astype(np.int64)
    sizes = pairs.offsets[sentences + 1] - starts
    # Each token's place in `ids`: its sentence's start plus its position in the sentence.
    token_index = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())
    return pairs.ids[token_index], sizes


HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so its powers modulo 2^64 never vanish


def _hash_token_runs(tokens: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """A polynomial hash modulo 2^64 of each run of `sizes` tokens (every run non-empty), mixed with its
    length: the sum over positions j of (token + 1) * HASH_BASE^j, wrapping as uint64 arithmetic does."""
    firsts = np.cumsum(sizes) - sizes
    positions = np.arange(len(tokens)) - np.repeat(firsts, sizes)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(int(sizes.max()), HASH_BASE, dtype=np.uint64))  # HASH_BASE^(j + 1)
        powers = np.concatenate([np.ones(1, dtype=np.uint64), powers[:-1]])
        terms = (tokens.astype(np.uint64) + np.uint64(1)) * powers[positions]
        return np.add.reduceat(terms, firsts) * HASH_BASE + sizes.astype(np.uint64)


class ConcatPairs(Dataset):
    """Several named PairDatasets end to end; a batch of global indices must come from one of them, and carries
    its name as `train_set` (the training step picks that set's loss)."""

    def __init__(self, parts: dict[str, PairDataset]):
        self.names, self.parts = list(parts), list(parts.values())
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int], batch_layout: Callable = PackedLayout) -> dict[str, torch.Tensor]:
        part = int(np.searchsorted(self.starts, indices[0], side="right")) - 1
        batch = self.parts[part].collate([i - int(self.starts[part]) for i in indices], batch_layout)
        return {**batch, "train_set": self.names[part]}


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's resumable-loader interface, delegating to its batch plan's state.

    Lightning restores a loader's state only if it builds the loader after restoring its loops, but
    `configure_optimizers` asks for `estimated_stepping_batches`, which builds it earlier. So PairDataModule's
    own state_dict carries the same state too, and restoring it twice is harmless.
    """

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
