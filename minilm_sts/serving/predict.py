"""`python -m minilm_sts predict`: embeddings for a file of sentences, or a similarity for each pair of a pair file."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from minilm_sts.atomic import write_file_atomically
from minilm_sts.data.pairs import is_sentence_file, read_sentences, read_unlabelled_pairs
from minilm_sts.data.sources import parse_source
from minilm_sts.errors import UserInputError
from minilm_sts.serving.loading import BACKENDS, load
from minilm_sts.serving.onnx_export import FP32_FILE

EMBEDDING_SUFFIXES = (".npy", ".parquet")


def predict(model, source: str, output: Path, batch_size: int = 32, column: str | None = None) -> Path:
    """Pair files (two sentence columns) give `output` as CSV with a cosine per row; anything else gives the
    embeddings of its sentences as .npy (an N x D array) or Parquet (sentence, embedding)."""
    source = parse_source(source)
    pairs = None if is_sentence_file(source) or column else read_unlabelled_pairs(source)
    if pairs is not None:
        if output.suffix != ".csv":
            raise UserInputError(f"{source.text} holds sentence pairs, which give one similarity per row: "
                                 "name a .csv output")
        # Both columns in one call: one progress bar for the whole job, and batches of similar length across both.
        embeddings = model.encode(pairs[0] + pairs[1], batch_size=batch_size, show_progress=True)
        left, right = embeddings[: len(pairs[0])], embeddings[len(pairs[0]) :]
        scores = (left * right).sum(dim=1).tolist()
        return write_file_atomically(output, lambda tmp: _write_scores(tmp, *pairs, scores))
    if output.suffix not in EMBEDDING_SUFFIXES:
        raise UserInputError(f"embeddings are written as {' or '.join(EMBEDDING_SUFFIXES)}, not {output.suffix!r}")
    sentences = read_sentences(source, column)
    embeddings = model.encode(sentences, batch_size=batch_size, show_progress=True).numpy()
    write = _write_npy if output.suffix == ".npy" else _write_parquet
    return write_file_atomically(output, lambda tmp: write(tmp, sentences, embeddings))


def _write_scores(path: Path, left: list[str], right: list[str], scores: list[float]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence_0", "sentence_1", "cosine"])
        writer.writerows(zip(left, right, (f"{s:.6f}" for s in scores)))


def _write_npy(path: Path, sentences: list[str], embeddings: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, embeddings)


def _write_parquet(path: Path, sentences: list[str], embeddings: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
    pq.write_table(pa.table({"sentence": sentences, "embedding": vectors}), path)


def predict_command(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m minilm_sts predict",
                                     description="Embed a file of sentences, or score each pair of a pair file.")
    parser.add_argument("model", help="a .ckpt written by fit, or an exported / sentence-transformers folder")
    parser.add_argument("input", help="sentences (.txt, one per line, or a table column) "
                                      "or pairs (.csv/.tsv/.jsonl/.parquet)")
    parser.add_argument("--output", "-o", type=Path, required=True,
                        help=".npy or .parquet for embeddings, .csv for pair scores")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--column", help="the sentence column of a table of single sentences")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="onnx: the exported folder's ONNX file through ONNX Runtime, on the CPU")
    parser.add_argument("--onnx-file", default=FP32_FILE,
                        help=f"with --backend onnx, the file in the folder (default {FP32_FILE}; e.g. "
                             "onnx/model_qint8_avx512_vnni.onnx)")
    options = parser.parse_args(args)
    model = load(options.model, options.device or "cpu", options.backend, options.onnx_file)
    print(f"Wrote {predict(model, options.input, options.output, options.batch_size, options.column)}")
