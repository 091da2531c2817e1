"""Export: a trained model as a folder that sentence-transformers and transformers both load (the folder's
layout is SentenceEncoder.save's), with the model card of the run that trained it."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm_sts.atomic import staged_folder
from minilm_sts.card import render_model_card
from minilm_sts.embedder import SentenceEncoder
from minilm_sts.errors import OutputExistsError
from minilm_sts.loading import load
from minilm_sts.module import SentenceEmbedder
from minilm_sts.module_callbacks import read_run_record


def export_model(encoder: SentenceEncoder, out_dir: str | Path, model_card: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write `encoder`, and `model_card` as README.md, to `out_dir`. The folder appears complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another folder, or replace it with "
                                "--overwrite (overwrite=True in Python)")
    with staged_folder(out_dir, replace=True) as staging:
        encoder.save(staging)
        if model_card is not None:
            (staging / "README.md").write_text(model_card, encoding="utf-8")
    return out_dir


def export_with_card(source: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Export a checkpoint written by fit with the model card of its run; a model folder gets a base model's card."""
    encoder = load(source)  # checks the path and the checkpoint, with the messages users see
    if Path(source).is_file():
        model = SentenceEmbedder.load_from_checkpoint(source, map_location="cpu")
        run = read_run_record(torch.load(source, map_location="cpu", weights_only=True, mmap=True))
    else:
        model, run = SentenceEmbedder(pretrained=str(source), max_seq_length=encoder.max_seq_length), None
    return export_model(encoder, out_dir, render_model_card(model, run), overwrite=overwrite)
