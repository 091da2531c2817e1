"""OnnxEncoder: an exported folder's ONNX graph run by ONNX Runtime on the CPU, with SentenceEncoder's `encode` and
`similarity`. The graph gives token embeddings; tokenization, batching by length and mean pooling are the
package's own, so its embeddings are PyTorch's up to the graph's rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from minilm_sts.errors import MissingInputError, UserInputError
from minilm_sts.model.bert import PaddingPlan
from minilm_sts.model.pooling import mean_pool
from minilm_sts.model.sentence_encoder import DEFAULT_MAX_SEQ_LENGTH, SentenceEncoder, _saved_max_seq_length
from minilm_sts.model.tokenization import load_tokenizer, tokenize_texts
from minilm_sts.serving.onnx_export import FP32_FILE, require_onnx


class OnnxEncoder:
    """Embeddings from `folder`'s ONNX file `file_name` (relative to the folder; a bare name is looked for in
    its onnx/ subfolder, as sentence-transformers does), e.g. "onnx/model_qint8_avx512_vnni.onnx".

    ONNX Runtime uses all of the process's cores for each batch (`threads` to choose)."""

    def __init__(self, folder: str | Path, file_name: str = FP32_FILE, threads: Optional[int] = None):
        (ort,) = require_onnx("onnxruntime")
        folder = Path(folder)
        path = folder / file_name if len(Path(file_name).parts) > 1 else folder / "onnx" / file_name
        if not path.is_file():
            raise MissingInputError(f"{path}: no such ONNX file (export writes {FP32_FILE} with --onnx, "
                                    "onnx/model_qint8_<arch>.onnx with --onnx-int8)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle threads that spin steal the cores from torch's, and torch's spinning OpenMP threads from these:
        # on 2 cores that halved int8 throughput (measured). So neither spins (see `encode`).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.hidden_size = self.session.get_outputs()[0].shape[-1]
        self.tokenizer = load_tokenizer(folder)
        self.max_seq_length = _saved_max_seq_length(folder) or DEFAULT_MAX_SEQ_LENGTH
        self.path = path

    similarity = staticmethod(SentenceEncoder.similarity)

    def encode(self, sentences: Sequence[str], batch_size: int = 32, normalize: bool = True,
               device: Optional[str | torch.device] = None, show_progress: bool = False) -> torch.Tensor:
        """Embeddings (N, D) in input order, float32 on the CPU, as SentenceEncoder.encode gives them. Batches
        hold sentences of similar token length, longest first, each padded to its own longest."""
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences; wrap a single sentence in a list")
        if device is not None and torch.device(device).type != "cpu":
            raise UserInputError(f"the onnx backend runs on the CPU, not {device}")
        ids, offsets, _ = tokenize_texts(self.tokenizer, sentences, self.max_seq_length)
        ids, offsets = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(offsets)
        lengths = offsets.diff()
        batches = torch.split(torch.argsort(-lengths, stable=True), batch_size) if len(lengths) else ()
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Encoding", unit="batch")
        out = torch.empty(len(sentences), self.hidden_size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # pooling is small; one thread leaves no OpenMP thread spinning beside the graph's
        try:
            for chunk in batches:
                packed = torch.cat([ids[offsets[i] : offsets[i + 1]] for i in chunk.tolist()])
                input_ids, attention_mask = PaddingPlan(lengths[chunk]).pad(packed)
                embeddings = mean_pool(self._token_embeddings(input_ids, attention_mask), attention_mask)
                out[chunk] = F.normalize(embeddings, p=2, dim=1) if normalize else embeddings
        finally:
            torch.set_num_threads(threads)
        return out

    def _token_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                "token_type_ids": np.zeros_like(input_ids.numpy())}
        (hidden,) = self.session.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in self.inputs})
        return torch.from_numpy(hidden)
