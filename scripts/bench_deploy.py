"""Deployment on this CPU: sentences per second at batch 1, 32 and 128, quality and size on disk for each way of
serving an exported model: our PyTorch `encode` (fp32, and bf16 under autocast where the CPU has native bf16),
our ONNX fp32 and int8 through `minilm_sts.load(backend="onnx")`, sentence-transformers' own PyTorch `encode`,
and its ONNX backend on both files (in its own environment, scripts/st_onnx_client.py).

    flock /tmp/bench.lock python scripts/bench_deploy.py --quora-dev ../shared/data/quora/dev.tsv \
        --json docs/benchmark-deploy.json

The model (the base all-MiniLM-L6-v2 unless --model names a checkpoint or folder) is exported with --onnx-int8
into a temporary folder. Throughput encodes the packaged STS-B test sentences (both columns, 2,758; the first
256 at batch 1), best of --rounds after a warm-up batch; quality is STS-B test Spearman and, with --quora-dev,
MRR@10 of duplicate retrieval over the first --quora-rows rows of that file. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import st_onnx_client
import torch
import torch.nn.functional as F

import minilm_sts
from minilm_sts.data.pairs import read_pairs
from minilm_sts.evaluation.correlations import correlations
from minilm_sts.evaluation.retrieval import DuplicateRetrieval
from minilm_sts.hardware import cpu_has_native_bf16, describe_machine, machine
from minilm_sts.model.pretrained import DEFAULT_MODEL, resolve_pretrained
from minilm_sts.serving.export import export_with_card
from minilm_sts.serving.onnx_export import FP32_FILE, quantization_arch

from benchmark import versions  # the in-process benchmark's, beside this script

BATCH_SIZES = (1, 32, 128)
BATCH_1_SENTENCES = 256
ST_TORCH = "sentence-transformers PyTorch fp32"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a .ckpt, a model folder or the default base model")
    parser.add_argument("--quora-dev", type=Path, help="a Quora dev pair file: MRR@10 per backend")
    parser.add_argument("--quora-rows", type=int, default=2000, help="its first rows (retrieval over their sentences)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-st-onnx", action="store_true", help="leave out sentence-transformers' ONNX backend")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def our_backends(folder: Path, int8_file: str) -> dict:
    """Name -> encode(sentences, batch_size) for the backends that run in this process."""
    from sentence_transformers import SentenceTransformer

    ours, st = minilm_sts.load(folder), SentenceTransformer(str(folder), device="cpu")
    backends = {"minilm_sts PyTorch fp32": ours.encode}
    if cpu_has_native_bf16():
        backends["minilm_sts PyTorch bf16 autocast"] = lambda sentences, batch_size: _bf16(ours, sentences, batch_size)
    backends["minilm_sts ONNX fp32"] = minilm_sts.load(folder, backend="onnx").encode
    backends["minilm_sts ONNX int8"] = minilm_sts.load(folder, backend="onnx", file_name=int8_file).encode
    backends[ST_TORCH] = lambda sentences, batch_size: st.encode(sentences, batch_size=batch_size,
                                                                 convert_to_tensor=True)
    return backends


def _bf16(model, sentences, batch_size):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model.encode(sentences, batch_size=batch_size)


def rate(encode, sentences: list[str], batch_size: int, rounds: int) -> float:
    """Best sentences per second of whole encodes of `sentences`, after a warm-up batch."""
    encode(sentences[:batch_size], batch_size=batch_size)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        encode(sentences, batch_size=batch_size)
        seconds.append(time.perf_counter() - started)
    return len(sentences) / min(seconds)


def quality(embed, stsb, quora) -> dict:
    """STS-B test Spearman and, if given, Quora dev MRR@10 from `embed` (sentences -> normalised embeddings)."""
    a, b = embed(stsb.sentences_a), embed(stsb.sentences_b)
    scores = {"stsb_test_spearman": correlations(F.cosine_similarity(a, b), torch.tensor(stsb.labels))[
        "spearman_cosine"]}
    if quora is not None:
        scores["quora_dev_mrr@10"] = quora.evaluate(embed)["cosine_mrr@10"]
    return scores


def st_onnx_rows(folder: Path, files: dict, throughput: list[str], stsb, quora, args, work: Path) -> dict:
    """sentence-transformers' ONNX backend on each file, run in its own environment: rates and quality."""
    corpus = quora.corpus if quora is not None else []
    sentences = stsb.sentences_a + stsb.sentences_b + corpus
    client = st_onnx_client.encode(folder, list(files.values()), sentences, work, BATCH_SIZES, len(throughput),
                                   BATCH_1_SENTENCES, args.rounds)
    rows = {}
    for label, file in files.items():
        lookup = dict(zip(sentences, torch.from_numpy(client["embeddings"][file])))
        row = {"sentences_per_second": {int(k): v for k, v in client["sentences_per_second"][file].items()},
               "size_bytes": (folder / file).stat().st_size}
        rows[f"sentence-transformers ONNX {label}"] = {**row, **quality(
            lambda texts: torch.stack([lookup[t] for t in texts]), stsb, quora)}
    return rows, client["versions"]


def markdown(rows: dict) -> str:
    reference = rows[ST_TORCH]["sentences_per_second"][32]
    header = ["Backend", *(f"sentences/s, batch {b}" for b in BATCH_SIZES), "batch 32 vs ST PyTorch",
              "STS-B test Spearman", "Quora dev MRR@10", "size on disk, MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        rates = [f"{r['sentences_per_second'][b]:,.0f}" for b in BATCH_SIZES]
        mrr = f"{r['quora_dev_mrr@10']:.4f}" if "quora_dev_mrr@10" in r else "-"
        lines.append("| " + " | ".join([name, *rates, f"{r['sentences_per_second'][32] / reference:.2f}x",
                                        f"{r['stsb_test_spearman']:.4f}", mrr, f"{r['size_bytes'] / 1e6:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    stsb = read_pairs("builtin:stsb/test")
    throughput = stsb.sentences_a + stsb.sentences_b
    quora = None
    if args.quora_dev:
        dev = read_pairs(str(args.quora_dev))
        first = slice(0, args.quora_rows)
        quora = DuplicateRetrieval.from_pairs(dev.sentences_a[first], dev.sentences_b[first], dev.labels[first])
    int8_file = f"onnx/model_qint8_{quantization_arch()}.onnx"
    with tempfile.TemporaryDirectory() as work:
        source = Path(args.model) if Path(args.model).exists() else resolve_pretrained(args.model)
        folder = export_with_card(source, Path(work) / "model", onnx_int8=True)
        rows = {}
        for name, encode in our_backends(folder, int8_file).items():
            rates = {b: rate(encode, throughput[:BATCH_1_SENTENCES] if b == 1 else throughput, b, args.rounds)
                     for b in BATCH_SIZES}
            file = int8_file if "int8" in name else FP32_FILE if "ONNX" in name else "model.safetensors"
            rows[name] = {"sentences_per_second": rates, "size_bytes": (folder / file).stat().st_size,
                          **quality(lambda texts: encode(texts, batch_size=32), stsb, quora)}
            print(name, rows[name], file=sys.stderr, flush=True)
        client_versions = None
        if not args.skip_st_onnx:
            st_rows, client_versions = st_onnx_rows(folder, {"fp32": FP32_FILE, "int8": int8_file}, throughput,
                                                    stsb, quora, args, Path(work) / "client")
            rows.update(st_rows)
    import onnxruntime

    found = {**versions(), "onnxruntime": onnxruntime.__version__}
    print(f"\nMachine: {describe_machine(machine())}\nVersions: {json.dumps(found)}"
          + (f"\nsentence-transformers' ONNX backend: {json.dumps(client_versions)}" if client_versions else "")
          + f"\n\n{markdown(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "versions": found, "client_versions": client_versions,
                                         "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
