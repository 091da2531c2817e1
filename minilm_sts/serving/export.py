"""Export: a trained model as a folder that sentence-transformers and transformers both load (the folder's
layout is SentenceEncoder.save's), with the model card of the run that trained it, and on request its ONNX
files (fp32 and int8) with their parity against PyTorch in the card."""

from __future__ import annotations

from pathlib import Path

from minilm_sts.atomic import staged_folder
from minilm_sts.errors import MissingInputError, OutputExistsError
from minilm_sts.model.checkpoint import check_checkpoint, encoder_from_checkpoint, read_run_record
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.merge_picture import MERGE_PICTURE, save_merge_picture
from minilm_sts.serving.model_card import render_deployment, render_model_card
from minilm_sts.serving.onnx_export import require_onnx, write_onnx_files


def export_model(encoder: SentenceEncoder, out_dir: str | Path, model_card: str | None = None, overwrite: bool = False,
                 onnx: bool = False, onnx_int8: bool = False, merge: dict | None = None) -> Path:
    """Write `encoder`, and `model_card` as README.md, to `out_dir`. The folder appears complete or not at all.
    `onnx` adds onnx/model.onnx, `onnx_int8` that and its int8 quantization, both checked against PyTorch
    (ExportParityError, and nothing written, if the fp32 graph is off) with the figures added to the card.
    `merge`, a run record's merge with the base, adds the picture of its curve that the card shows."""
    out_dir = Path(out_dir)
    if onnx or onnx_int8:
        require_onnx()  # before any work
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; choose another folder, or replace it with "
                                "--overwrite (overwrite=True in Python)")
    with staged_folder(out_dir, replace=True) as staging:
        encoder.save(staging)
        if onnx or onnx_int8:
            parity = write_onnx_files(encoder, staging, int8=onnx_int8)
            model_card = None if model_card is None else model_card + "\n" + render_deployment(parity)
        if model_card is not None:
            (staging / "README.md").write_text(model_card, encoding="utf-8")
        if merge:
            save_merge_picture(merge, staging / MERGE_PICTURE)
    return out_dir


def export_with_card(source: Path, out_dir: Path, overwrite: bool = False, onnx: bool = False,
                     onnx_int8: bool = False) -> Path:
    """Export a checkpoint written by fit with the model card of its run (the checkpoint is read once, and no
    training module is built); a model folder gets a base model's card. `onnx`, `onnx_int8`: as export_model."""
    if onnx or onnx_int8:
        require_onnx()  # before the checkpoint is read
    source = Path(source)
    if source.is_file():
        checkpoint = check_checkpoint(source)  # with the messages users see
        encoder, hparams, run = (encoder_from_checkpoint(checkpoint), checkpoint["hyper_parameters"],
                                 read_run_record(checkpoint))
    elif source.is_dir():
        encoder, run = SentenceEncoder.from_pretrained(source), None
        hparams = {"pretrained": str(source), "max_seq_length": encoder.max_seq_length,
                   "encoder_config": encoder.bert.config.to_dict()}
    else:
        raise MissingInputError(f"{source}: no such checkpoint file or model folder")
    return export_model(encoder.eval(), out_dir, render_model_card(hparams, run), overwrite, onnx, onnx_int8,
                        (run or {}).get("merge"))
