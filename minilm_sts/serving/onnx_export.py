"""ONNX export: a SentenceEncoder's BERT as `onnx/model.onnx` inside its sentence-transformers folder, an int8
copy by ONNX Runtime's dynamic quantization as `onnx/model_qint8_<arch>.onnx`, and the parity check that export
runs against PyTorch before the folder is written.

The graph is the transformer alone, as sentence-transformers' ONNX backend loads it: inputs `input_ids`,
`attention_mask` and `token_type_ids` (batch x sequence, both axes dynamic), output `last_hidden_state`. Mean
pooling and normalisation stay outside it, in the folder's 1_Pooling and 2_Normalize modules, which that
backend runs in PyTorch and `OnnxEncoder` in numpy and torch.
"""

from __future__ import annotations

import importlib
import logging
import platform
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minilm_sts.data.pairs import read_pairs
from minilm_sts.errors import UserInputError
from minilm_sts.evaluation.correlations import correlations
from minilm_sts.model.bert import BertModel, PaddedLayout
from minilm_sts.model.sentence_encoder import SentenceEncoder

EXTRA_HINT = "pip install 'minilm-sts[onnx]'"
FP32_FILE = "onnx/model.onnx"
# Export refuses an fp32 graph whose normalised embeddings differ from PyTorch's by more than this.
FP32_TOLERANCE = 1e-4
# Sentences the parity check encodes with every backend: both columns of the packaged STS-B test split, so the
# same pass gives each backend's STS-B test Spearman.
PARITY_SAMPLE = "builtin:stsb/test"
OPSET = 18  # the lowest that torch's exporter writes without converting
# The three Gathers are the word, position and token-type embeddings: quantizing them stores the 30,522 x 384
# word-embedding matrix in int8 too (without it the int8 file keeps 47 MB of fp32, 65% of the fp32 file).
QUANTIZED_OPS = ["MatMul", "Gather"]
# CPU flag -> the name sentence-transformers gives an int8 file for it, the widest first.
X86_ARCHS = (("avx512_vnni", "avx512_vnni"), ("avx512f", "avx512"), ("avx2", "avx2"))


class ExportParityError(UserInputError):
    """An exported graph that does not compute what the PyTorch model computes; nothing is written."""


def require_onnx(*modules: str) -> list:
    """Import the ONNX packages export and the onnx backend need, or say in one line which extra installs them."""
    found = []
    for name in modules or ("onnx", "onnxruntime", "onnxscript"):
        try:
            found.append(importlib.import_module(name))
        except ImportError as err:
            raise UserInputError(f"the ONNX export and backend need {name}, which is not installed: {EXTRA_HINT} "
                                 "(the 'onnx' extra)") from err
    return found


class TransformerGraph(nn.Module):
    """Our BERT with the inputs and output of Hugging Face's BertModel, the module sentence-transformers' ONNX
    backend replaces with the graph. Token types are looked up from the input, as a BertModel does (our
    Embeddings assume type 0, the only one single sentences have)."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.bert.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (embeddings.word_embeddings(input_ids) + embeddings.position_embeddings(positions)
             + embeddings.token_type_embeddings(token_type_ids))
        return self.bert.encoder(embeddings.LayerNorm(x), PaddedLayout(attention_mask))


def export_onnx(encoder: SentenceEncoder, folder: Path) -> Path:
    """Write the encoder's BERT to `folder`/onnx/model.onnx, with dynamic batch and sequence axes."""
    require_onnx()
    path = Path(folder) / FP32_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = TransformerGraph(encoder.bert).eval()
    # Two sentences of different lengths, so the trace sees a real mask (the ids are any the vocabulary holds);
    # grad mode on keeps every layer on torch's plain operators (the oneDNN and in-place inference shortcuts
    # apply only without autograd).
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    example = (attention_mask * torch.arange(1, 6), attention_mask, torch.zeros_like(attention_mask))
    longest = encoder.bert.config.max_position_embeddings
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=longest)
    axes = {0: batch, 1: sequence}
    with torch.enable_grad(), _quiet_exporter():
        torch.onnx.export(graph, example, str(path), dynamo=True, external_data=False, opset_version=OPSET,
                          verbose=False, input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_shapes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes})
    return path


@contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that both inputs share the batch and sequence axes (they are meant to) and
    that torchvision's operators are not registered (a BERT has none)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def quantization_arch() -> str:
    """The instruction set an int8 file is named for, as sentence-transformers names them (arm64, avx2, avx512,
    avx512_vnni): this CPU's."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text(errors="replace").split()) if cpuinfo.is_file() else set()
    return next((arch for flag, arch in X86_ARCHS if flag in flags), "avx2")


def quantize_int8(folder: Path) -> Path:
    """Write `folder`/onnx/model_qint8_<arch>.onnx from the fp32 graph: ONNX Runtime's dynamic quantization,
    int8 weights per output channel (per-tensor scales cost 0.8 of the worst sentence's cosine here), with
    activations quantized per batch at run time."""
    (quantization,) = require_onnx("onnxruntime.quantization")
    arch = quantization_arch()
    path = Path(folder) / f"onnx/model_qint8_{arch}.onnx"
    # Without VNNI, x86 int8 products can saturate: ONNX Runtime's advice is 7-bit weights there.
    root = logging.getLogger()
    root.addFilter(_not_preprocessing_advice)
    try:
        quantization.quantize_dynamic(Path(folder) / FP32_FILE, path, op_types_to_quantize=QUANTIZED_OPS,
                                      per_channel=True, reduce_range=arch in ("avx2", "avx512"),
                                      weight_type=quantization.QuantType.QInt8)
    finally:
        root.removeFilter(_not_preprocessing_advice)
    return path


def _not_preprocessing_advice(record: logging.LogRecord) -> bool:
    """False for the quantizer's advice to run its shape-inference pre-pass, which dynamic quantization of a
    graph with dynamic axes does not need."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


@dataclass(frozen=True)
class BackendParity:
    """One backend's embeddings of the parity sample against PyTorch's (both L2-normalised)."""

    backend: str
    file: str  # relative to the folder; "model.safetensors" for PyTorch
    size_bytes: int
    max_abs_diff: float
    min_cosine: float
    stsb_test_spearman: float


def measure_parity(encoder: SentenceEncoder, folder: Path, files: list[str],
                   sample: str = PARITY_SAMPLE) -> list[BackendParity]:
    """PyTorch's row, then a row per ONNX file (relative to `folder`), from encoding `sample`'s sentences."""
    from minilm_sts.serving.onnx_encoder import OnnxEncoder  # it imports this module's require_onnx

    pairs = read_pairs(sample)
    reference = encoder.encode(pairs.sentences_a + pairs.sentences_b)
    rows = [_parity("pytorch", "model.safetensors", folder, reference, reference, pairs.labels)]
    for file in files:
        embeddings = OnnxEncoder(folder, file).encode(pairs.sentences_a + pairs.sentences_b)
        rows.append(_parity("onnx" if file == FP32_FILE else "onnx int8", file, folder, embeddings, reference,
                            pairs.labels))
    return rows


def _parity(backend: str, file: str, folder: Path, embeddings: torch.Tensor, reference: torch.Tensor,
            labels: list[float]) -> BackendParity:
    half = len(labels)
    spearman = correlations(F.cosine_similarity(embeddings[:half], embeddings[half:]), torch.tensor(labels))
    return BackendParity(backend, file, (Path(folder) / file).stat().st_size,
                         float((embeddings - reference).abs().max()),
                         float(F.cosine_similarity(embeddings, reference).min()), spearman["spearman_cosine"])


def write_onnx_files(encoder: SentenceEncoder, folder: Path, int8: bool,
                     sample: str = PARITY_SAMPLE) -> list[BackendParity]:
    """Export (and quantize) into `folder`, then check parity: an fp32 graph further than FP32_TOLERANCE from
    PyTorch is refused. Returns the parity rows for the model card."""
    files = [export_onnx(encoder, folder).relative_to(folder).as_posix()]
    if int8:
        files.append(quantize_int8(folder).relative_to(folder).as_posix())
    rows = measure_parity(encoder, folder, files, sample)
    fp32 = rows[1]
    if fp32.max_abs_diff > FP32_TOLERANCE:
        raise ExportParityError(f"the exported {FP32_FILE} differs from PyTorch by {fp32.max_abs_diff:.2e} (max abs, "
                                f"normalised embeddings of {sample}), more than {FP32_TOLERANCE:g}: nothing written")
    return rows
