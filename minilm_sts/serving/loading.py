"""`minilm_sts.load`: a SentenceEncoder from a checkpoint written by `fit` or from a model folder, and the check
that a file is such a checkpoint. A checkpoint is read as plain tensors and values: no Lightning trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm_sts.errors import MissingInputError
from minilm_sts.model.checkpoint import check_checkpoint, encoder_from_checkpoint
from minilm_sts.model.sentence_encoder import SentenceEncoder


def load(path: str | Path, map_location: str | torch.device = "cpu") -> SentenceEncoder:
    """A model ready to `encode`, from a Lightning checkpoint (.ckpt) or an exported / sentence-transformers folder
    (its own max length, else 128)."""
    path = Path(path)
    if path.is_file():
        encoder = encoder_from_checkpoint(check_checkpoint(path))
    elif path.is_dir():
        encoder = SentenceEncoder.from_pretrained(path)
    else:
        raise MissingInputError(f"{path}: no such checkpoint file or model folder")
    return encoder.to(map_location).eval()


