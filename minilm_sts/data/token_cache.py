"""Tokenize a pair source once and keep its token ids and labels on disk as flat numpy arrays, with two counts
(sentences that reached the max length, invalid rows dropped) and nothing else.

The cache key covers everything that decides the ids: the source's fingerprint (a file's bytes and the
format its name selects, or a Hub dataset's revision), the reading options, the tokenizer and the max length.
So a changed file or tokenizer never reuses stale ids, and a warm cache gives what a cold one would. Entries are
written to a temporary folder and renamed into place (`staged_folder`), so an interrupted write never leaves a half
entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from minilm_sts.atomic import staged_folder
from minilm_sts.data.pairs import ReadOptions, read_pairs
from minilm_sts.data.sources import Source, parse_source
from minilm_sts.model.tokenization import tokenize_texts

CACHE_FORMAT = 5  # 5: no sample rows or column names (a model card reads those from the source)
ARRAYS = ("ids", "offsets", "labels")
META = ("at_max_length", "dropped")


def cache_root() -> Path:
    return Path(os.environ.get("MINILM_STS_CACHE", Path.home() / ".cache" / "minilm_sts"))


@dataclass
class TokenizedPairs:
    """Pair i has sentence A at ids[offsets[2i]:offsets[2i+1]] and sentence B at ids[offsets[2i+1]:offsets[2i+2]]."""

    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    at_max_length: int = 0  # sentences that reached the max length (and so were most likely truncated)
    dropped: int = 0  # invalid rows left out under drop_invalid

    def __len__(self) -> int:
        return len(self.labels)

    def sentence(self, k: int) -> np.ndarray:
        return self.ids[self.offsets[k] : self.offsets[k + 1]]


def load_tokenized(source: str | Source, tokenizer, max_length: int, options: ReadOptions = ReadOptions(),
                   **option_fields) -> TokenizedPairs:
    """Tokenized pairs for `source`, from the cache when an entry with the same key exists. `option_fields` set
    single fields of `options`, as in `load_tokenized(path, tokenizer, 128, label_scale=5.0)`."""
    source, options = parse_source(source), replace(options, **option_fields)
    entry = cache_root() / _cache_key(source, tokenizer, max_length, options)
    cached = _read_entry(entry)
    if cached is not None:
        return cached
    table = read_pairs(source, options)
    interleaved = [text for pair in zip(table.sentences_a, table.sentences_b) for text in pair]
    ids, offsets, at_limit = tokenize_texts(tokenizer, interleaved, max_length)
    pairs = TokenizedPairs(ids, offsets, np.asarray(table.labels, dtype=np.float32), at_limit, table.dropped)
    _write_entry(entry, pairs)
    return pairs


def _cache_key(source: Source, tokenizer, max_length: int, options: ReadOptions) -> str:
    key = {"cache_format": CACHE_FORMAT, "source": source.fingerprint(), "read": asdict(options),
           "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's definition without its call-time state: a call with truncation=True stores the
    truncation settings inside the backend tokenizer, which must not change the cache key."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


def _read_entry(entry: Path) -> TokenizedPairs | None:
    """The cached pairs, or None when absent or damaged (a damaged entry is removed and rebuilt)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        pairs = TokenizedPairs(**arrays, **{key: meta[key] for key in META})
        consistent = (len(pairs.offsets) == 2 * len(pairs) + 1 and pairs.offsets[-1] == len(pairs.ids)
                      and meta["pairs"] == len(pairs))
    except (OSError, ValueError, KeyError):
        consistent = False
    if not consistent:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return pairs


def _write_entry(entry: Path, pairs: TokenizedPairs) -> None:
    # replace=False: if another process finished the same entry first, theirs is identical.
    with staged_folder(entry, replace=False) as staging:
        for name in ARRAYS:
            np.save(staging / f"{name}.npy", getattr(pairs, name))
        meta = {"pairs": len(pairs), **{key: getattr(pairs, key) for key in META}}
        (staging / "meta.json").write_text(json.dumps(meta))
