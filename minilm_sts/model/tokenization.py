"""Tokenizers: loading one from a model folder, carrying one inside a checkpoint as plain files, and the one
tokenizer call that training data and `encode` share."""

from __future__ import annotations

import tempfile
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np

TOKENIZE_CHUNK = 8192


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Flat ids and offsets for `texts`, truncated to `max_length` ids including [CLS] and [SEP], and the
    number of sentences that reached that limit (and so were most likely truncated)."""
    id_lists: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        encoded = tokenizer(chunk, truncation=True, max_length=max_length,
                            return_attention_mask=False, return_token_type_ids=False)
        id_lists.extend(encoded["input_ids"])
    lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    at_limit = int((lengths >= max_length).sum())
    offsets = np.zeros(len(id_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=dtype, count=int(offsets[-1]))
    return ids, offsets, at_limit


def load_tokenizer(folder: str | Path):
    """The fast tokenizer saved in `folder`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer as {file name: text}: plain values, so a checkpoint holding them loads with weights_only."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text() for p in Path(folder).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, str]):
    """The tokenizer that `tokenizer_files` gave these files for."""
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text)
        return load_tokenizer(folder)
