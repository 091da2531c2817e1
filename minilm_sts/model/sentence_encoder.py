"""SentenceEncoder: a BERT, its tokenizer and mean pooling, ready to embed sentences, with no Lightning involved.

It reads and writes the sentence-transformers folder, in the most portable layout sentence-transformers reads
(3.x to 6.x, no trust_remote_code): legacy module type names, legacy pooling keys, an empty 2_Normalize folder,
and a plain BertModel checkpoint at the root.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from minilm_sts._compat import no_silent_recompile_fallback
from minilm_sts.errors import UserInputError
from minilm_sts.model.bert import BertConfig, BertModel, HostBuiltLayout, PackedLayout, PaddedLayout, PaddingPlan
from minilm_sts.model.pretrained import resolve_pretrained
from minilm_sts.model.tokenization import load_tokenizer, tokenize_texts
from minilm_sts.version import __version__

# Under `compile`, batch widths are rounded up to this: at most 8 distinct widths up to 128 tokens, so compiled
# code and CUDA graphs are reused instead of rebuilt for every new longest sentence.
COMPILED_WIDTH_MULTIPLE = 16
# Encode runs at most this many batches at once: each holds Python's lock between its operators, so many more
# workers would queue on it rather than compute.
MAX_ENCODE_WORKERS = 8
# A folder that does not say its max length gets the recipe's.
DEFAULT_MAX_SEQ_LENGTH = 128
LEGACY_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


class SentenceEncoder(nn.Module):
    """Mean-pooled BERT sentence embeddings: `encode` for lists of sentences, `forward` for packed token ids.

    Args:
        bert: the BERT whose token embeddings are pooled.
        tokenizer: its fast tokenizer, or None to load the one of `pretrained` on first use.
        max_seq_length: sentences are truncated to this many tokens, [CLS] and [SEP] included.
        compile: run the BERT through `torch.compile` (CUDA graphs on a GPU). Compiled graphs want few shapes,
            so this path pads each batch to a width rounded up to a multiple of 16 tokens instead of packing it;
            it pays where launch overhead dominates (a GPU at batch 32), not on a CPU.
        pretrained: the Hub id or folder the model came from.
    """

    def __init__(self, bert: BertModel, tokenizer=None, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
                 compile: bool = False, pretrained: Optional[str] = None):
        super().__init__()
        if max_seq_length > bert.config.max_position_embeddings:
            raise UserInputError(f"max_seq_length {max_seq_length} exceeds the model's "
                                 f"{bert.config.max_position_embeddings} position embeddings")
        self.bert = bert
        self._tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.use_compile = compile
        self.pretrained = pretrained
        self._compiled_embeddings = None  # built on first use, once the device is known

    @classmethod
    def from_pretrained(cls, name: str | Path, max_seq_length: Optional[int] = None,
                        compile: bool = False) -> "SentenceEncoder":
        """A Hugging Face model folder or Hub id, or a folder written by `save` or by sentence-transformers.
        `max_seq_length` defaults to the folder's own (sentence_bert_config.json), else 128."""
        folder = resolve_pretrained(str(name))
        bert = BertModel(BertConfig.from_folder(folder))
        bert.load_safetensors(folder / "model.safetensors")
        max_seq_length = max_seq_length or _saved_max_seq_length(folder) or DEFAULT_MAX_SEQ_LENGTH
        return cls(bert, load_tokenizer(folder), max_seq_length, compile, pretrained=str(name))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_pretrained(self.pretrained))
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    # ----- embedding -------------------------------------------------------------------------------------------

    @property
    def batch_layout(self):
        """What makes a batch's layout from its lengths, for this path: a PackedLayout, or under `compile` a
        PaddingPlan to a width multiple of 16. A picklable callable, so a loader's workers can make it."""
        return functools.partial(PaddingPlan, width_multiple=COMPILED_WIDTH_MULTIPLE) if self.use_compile \
            else PackedLayout

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                layout: Optional[HostBuiltLayout] = None) -> torch.Tensor:
        """Mean-pooled, unnormalised sentence embeddings (the cosine loss is scale-invariant) of packed sentences:
        `input_ids` holds their token ids end to end, `lengths` how many belong to each. `layout`, the
        `batch_layout` of `lengths` if the caller made it already (on the host), saves making it here from
        sizes read back from the device."""
        wanted = PaddingPlan if self.use_compile else PackedLayout
        if not isinstance(layout, wanted):
            layout = self.batch_layout(lengths)
        if not self.use_compile:
            return self.bert.sentence_embeddings(input_ids, layout)
        ids, mask = layout.pad(input_ids)
        if ids.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # earlier calls' outputs are consumed by now
        return self._compiled(ids, mask)

    def _compiled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The compiled padded path. A graph break or a recompile beyond torch's limit raises instead of falling
        back to eager code in silence. The first call, which compiles, says how long it took."""
        first = self._compiled_embeddings is None
        if first:
            # On a GPU a step of this small model is mostly kernel launches: CUDA graphs replay them at once.
            mode = "reduce-overhead" if ids.is_cuda else "default"
            if not ids.is_cuda:
                warnings.warn("compile=True on a CPU trains slower than the default packed path (docs/benchmarks.md): "
                              "it pads batches and spends a minute compiling; it is meant for GPUs", stacklevel=3)
            self._compiled_embeddings = torch.compile(self._padded_embeddings, mode=mode, fullgraph=True)
            started = time.perf_counter()
        with no_silent_recompile_fallback():
            embeddings = self._compiled_embeddings(ids, mask)
        if first:  # a wait for the device, once: the figure says what start-up cost
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            print(f"torch.compile: the first batch took {time.perf_counter() - started:.1f} s, compilation included "
                  "(its backward and each new width or batch size compile as they come; torch keeps compiled "
                  "code in its cache, TORCHINDUCTOR_CACHE_DIR, so a later run starts faster)", file=sys.stderr)
        return embeddings

    def _padded_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert.sentence_embeddings(input_ids, PaddedLayout(attention_mask))

    def tokenize(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Packed token ids ([CLS] ... [SEP], truncated at max_seq_length) and the length of each sentence."""
        ids, offsets, _ = tokenize_texts(self.tokenizer, sentences, self.max_seq_length)
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "lengths": torch.from_numpy(np.diff(offsets))}

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], batch_size: int = 32, normalize: bool = True,
               device: Optional[str | torch.device] = None, show_progress: bool = False) -> torch.Tensor:
        """Embeddings (N, D) in input order, float32 on the CPU. Sentences are batched by token length so each
        batch's attention pads little; the order is restored afterwards."""
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences; wrap a single sentence in a list")
        if device is not None:
            self.to(device)
        was_training = self.training
        self.eval()
        # One tokenizer call for everything, then batches of similar token length, longest first.
        tokens = self.tokenize(sentences)
        ids, lengths = tokens["input_ids"], tokens["lengths"]
        offsets = torch.cumsum(lengths, 0) - lengths
        batches = torch.split(torch.argsort(-lengths, stable=True), batch_size)
        # Grad mode and autocast are per thread: worker threads take the caller's.
        device_type = self.device.type
        autocast_dtype, autocast_on = torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)

        def embed(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                input_ids = torch.cat([ids[offsets[i] : offsets[i] + lengths[i]] for i in chunk.tolist()])
                layout = self.batch_layout(lengths[chunk]).to(self.device)
                embeddings = self(input_ids.to(self.device), lengths[chunk].to(self.device), layout).float()
                return (F.normalize(embeddings, p=2, dim=1) if normalize else embeddings).cpu()

        results = self._map_batches(embed, batches)
        if show_progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(batches), desc="Encoding", unit="batch")
        out = torch.empty(len(sentences), self.bert.config.hidden_size)
        try:
            # strict: after the last batch, zip asks `results` for one more, which ends the progress bar at 100%.
            for chunk, embeddings in zip(batches, results, strict=True):
                out[chunk] = embeddings
        finally:
            self.train(was_training)
        return out

    def _map_batches(self, embed, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`embed` of each batch, in order. On a CPU, several batches run at once, each on its share of the
        threads: an inference batch's matrix products are small, and splitting each across all cores costs more
        in synchronisation than running whole batches side by side (11% faster on this project's 2 cores)."""
        threads = torch.get_num_threads()
        workers = min(threads, MAX_ENCODE_WORKERS)
        if self.device.type != "cpu" or workers == 1 or self.use_compile:  # compiled code is not thread-safe
            yield from map(embed, batches)
            return
        try:
            # Under OpenMP (Linux, Windows) the thread count is per thread; the finally covers other backends.
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads // workers,)) as pool:
                yield from pool.map(embed, batches)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix (len(a), len(b)) between two sets of embeddings."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    # ----- the sentence-transformers folder --------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write the model into `folder` (which must exist) as sentence-transformers and transformers load it:
        config.json, model.safetensors, the tokenizer files, modules.json, sentence_bert_config.json,
        1_Pooling/config.json, 2_Normalize/ and config_sentence_transformers.json."""
        import transformers

        folder = Path(folder)
        transformers.BertConfig(**self.bert.config.to_dict(), architectures=["BertModel"]).save_pretrained(folder)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.bert.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.model_max_length = self.max_seq_length  # sentence-transformers >= 5.4 reads the length here
        self.tokenizer.save_pretrained(folder)
        _write_json(folder / "modules.json", LEGACY_MODULES)
        _write_json(folder / "sentence_bert_config.json",
                    {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        _write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": self.bert.config.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        })
        (folder / "2_Normalize").mkdir()
        _write_json(folder / "config_sentence_transformers.json", {
            "model_type": "SentenceTransformer",
            "__version__": {"minilm_sts": __version__, "transformers": transformers.__version__,
                            "pytorch": torch.__version__},
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        })


def _saved_max_seq_length(folder: Path) -> int | None:
    """The max length a sentence-transformers folder was saved with, if it says."""
    config = Path(folder) / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length") if config.is_file() else None


def _write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
