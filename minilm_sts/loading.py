"""`minilm_sts.load`: a SentenceEncoder from a checkpoint written by `fit` or from a model folder, and the check
that a file is such a checkpoint. A checkpoint is read as plain tensors and values: no Lightning trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm_sts.embedder import SentenceEncoder, tokenizer_from_files
from minilm_sts.encoder import BertConfig, BertModel
from minilm_sts.errors import MissingInputError, UserInputError
from minilm_sts.module import TOKENIZER_CHECKPOINT_KEY, embedder_state_dict


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


def check_checkpoint(path: Path) -> dict:
    """The checkpoint's contents; fails with a plain message on a missing or damaged file or a checkpoint of
    some other model."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such checkpoint file")
    try:
        # mmap: the check reads the archive's structure and plain values; tensors are read when used.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or non-checkpoint files
        raise UserInputError(f"{path}: not a readable checkpoint, perhaps truncated or corrupt ({err})") from err
    if "encoder_config" not in checkpoint.get("hyper_parameters", {}):
        raise UserInputError(f"{path}: this checkpoint was not written by minilm_sts's SentenceEmbedder")
    return checkpoint


def encoder_from_checkpoint(checkpoint: dict) -> SentenceEncoder:
    """The SentenceEncoder a SentenceEmbedder checkpoint holds: its architecture, weights and tokenizer (or,
    in a checkpoint without tokenizer files, the tokenizer of the model it was trained from)."""
    h = checkpoint["hyper_parameters"]
    files = checkpoint.get(TOKENIZER_CHECKPOINT_KEY)
    encoder = SentenceEncoder(BertModel(BertConfig.from_dict(h["encoder_config"])),
                              tokenizer_from_files(files) if files else None,
                              h["max_seq_length"], h.get("compile", False), h["pretrained"])  # compile came later
    encoder.load_state_dict(embedder_state_dict(checkpoint["state_dict"]), strict=True)
    return encoder
