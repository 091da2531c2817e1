"""sentence-transformers' own ONNX backend as a real client of an exported folder, in an environment of its own.

`sentence-transformers[onnx]` needs optimum-onnx, which pins transformers below 4.58, so pip installs it with
sentence-transformers 5.7 and transformers 4.57, not beside the dev extra's 6.x and 5.x
(/work/shared/notes/deploy-clients.md). `client_python()` builds that environment once, a venv that sees the
machine's torch and installs only the client's exact pins (about 30 s), and reuses it from the cache; `encode`
runs this file inside it and hands the embeddings back as .npy files. Imported by tests/serving and
scripts/bench_deploy.py; run by them as

    CLIENT_PYTHON st_onnx_client.py FOLDER SENTENCES.json OUT_DIR --file onnx/model.onnx [--time 1 32 128]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Exact pins, so pip has nothing to search (an unpinned resolve takes 4 minutes here); torch is the machine's
# CPU build, which pip finds installed or on local disk.
CLIENT_PINS = ["torch==2.13.0", "sentence-transformers[onnx]==5.7.0", "transformers==4.57.6", "optimum==2.1.0",
               "optimum-onnx==0.1.0", "huggingface_hub==0.36.2", "tokenizers==0.22.2",
               "datasets==3.6.0"]  # sentence-transformers imports datasets if installed; the machine's needs hub 1.x


def client_python() -> Path:
    """The client environment's python, built on first use under MINILM_STS_CLIENT_CACHE (default
    ~/.cache/minilm_sts) and keyed by the pins and this Python: a lock keeps parallel builders to one."""
    key = hashlib.sha256(json.dumps([CLIENT_PINS, sys.version, sys.base_prefix]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("MINILM_STS_CLIENT_CACHE", Path.home() / ".cache" / "minilm_sts"))
    venv = cache / f"st-onnx-client-{key}"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "complete").is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", str(venv)], check=True)
            installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *CLIENT_PINS],
                                       capture_output=True, text=True)
            if installed.returncode != 0:
                raise RuntimeError(f"building the client environment {venv} failed:\n{installed.stderr[-3000:]}")
            (venv / "complete").touch()  # last: an interrupted build is redone
    return python


def encode(folder: Path, files: list[str], sentences: list[str], work: Path, time_batches=(), timed: int = 0,
           timed_at_batch_1: int = 0, rounds: int = 1) -> dict:
    """Each ONNX file's embeddings of `sentences` by sentence-transformers' ONNX backend in the client
    environment ({file: array}), its versions and, for `time_batches`, sentences per second at each batch size
    (best of `rounds` encodes of the first `timed` sentences, the first `timed_at_batch_1` at batch 1)."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    (work / "sentences.json").write_text(json.dumps(sentences))
    command = [str(client_python()), __file__, str(folder), str(work / "sentences.json"), str(work)]
    command += [arg for file in files for arg in ("--file", file)]
    if time_batches:
        command += ["--time", *map(str, time_batches), "--timed", str(timed), "--timed-at-batch-1",
                    str(timed_at_batch_1), "--rounds", str(rounds)]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads((work / "client.json").read_text())
    report["embeddings"] = {file: np.load(work / f"{i}.npy") for i, file in enumerate(files)}
    return report


def run_client(args: argparse.Namespace) -> None:
    """Inside the client environment: load the folder once per file, encode, save, and time if asked."""
    import numpy as np
    import optimum.onnxruntime
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    sentences = json.loads(Path(args.sentences).read_text())
    report = {"versions": {"sentence-transformers": sentence_transformers.__version__,
                           "transformers": transformers.__version__,
                           "optimum-onnx": _version("optimum-onnx"), "module": optimum.onnxruntime.__name__},
              "sentences_per_second": {}}
    for i, file in enumerate(args.file):
        model = SentenceTransformer(args.folder, device="cpu", backend="onnx", model_kwargs={"file_name": file})
        np.save(Path(args.out) / f"{i}.npy", model.encode(sentences, batch_size=32, convert_to_numpy=True))
        timed = sentences[: args.timed]
        report["sentences_per_second"][file] = {
            size: _rate(model, timed[: args.timed_at_batch_1] if size == 1 else timed, size, args.rounds)
            for size in args.time}
    (Path(args.out) / "client.json").write_text(json.dumps(report, indent=2))


def _rate(model, sentences: list[str], batch_size: int, rounds: int) -> float:
    """Best sentences per second of `rounds` encodes of `sentences`, after a warm-up batch (as bench_deploy's)."""
    model.encode(sentences[:batch_size], batch_size=batch_size)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        model.encode(sentences, batch_size=batch_size)
        seconds.append(time.perf_counter() - started)
    return len(sentences) / min(seconds)


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("sentences", help="a JSON list of sentences")
    parser.add_argument("out", help="where the embeddings (<i>.npy, i the file's position) and client.json go")
    parser.add_argument("--file", action="append", required=True, help="an ONNX file of the folder (onnx/model.onnx)")
    parser.add_argument("--time", type=int, nargs="*", default=[], help="batch sizes to time")
    parser.add_argument("--timed", type=int, default=0, help="how many of the sentences each timed encode takes")
    parser.add_argument("--timed-at-batch-1", type=int, default=0, help="the same at batch 1")
    parser.add_argument("--rounds", type=int, default=1)
    run_client(parser.parse_args())
