"""`minilm_sts.load`: a SentenceEncoder from a checkpoint written by `fit` or from a model folder, and the check
that a file is such a checkpoint. A checkpoint is read as plain tensors and values: no Lightning trainer. With
`backend="onnx"`, an exported folder's ONNX graph instead (an OnnxEncoder, with the same `encode`)."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm_sts.errors import MissingInputError, UserInputError
from minilm_sts.model.checkpoint import check_checkpoint, encoder_from_checkpoint
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.onnx_export import FP32_FILE

BACKENDS = ("torch", "onnx")


def load(path: str | Path, map_location: str | torch.device = "cpu", backend: str = "torch",
         file_name: str = FP32_FILE):
    """A model ready to `encode`, from a Lightning checkpoint (.ckpt) or an exported / sentence-transformers folder
    (its own max length, else 128). `backend="onnx"` runs the folder's ONNX file `file_name` (e.g.
    "onnx/model_qint8_avx512_vnni.onnx") through ONNX Runtime on the CPU instead of the PyTorch weights."""
    path = Path(path)
    if backend not in BACKENDS:
        raise UserInputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "onnx":
        from minilm_sts.serving.onnx_encoder import OnnxEncoder

        if not path.is_dir():
            raise MissingInputError(f"{path}: the onnx backend loads a folder written by export --onnx")
        if torch.device(map_location).type != "cpu":
            raise UserInputError(f"the onnx backend runs on the CPU, not {map_location}")
        return OnnxEncoder(path, file_name)
    if path.is_file():
        encoder = encoder_from_checkpoint(check_checkpoint(path))
    elif path.is_dir():
        encoder = SentenceEncoder.from_pretrained(path)
    else:
        raise MissingInputError(f"{path}: no such checkpoint file or model folder")
    return encoder.to(map_location).eval()


