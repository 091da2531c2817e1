"""Preparation in chunks: any chunk size and any number of processes give the arrays of one chunk, with the same
errors and counts; an interrupted preparation leaves no entry and resumes from its chunks; under distributed
training every process tokenizes its share and all read the same data."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import minilm_sts.data.token_cache as token_cache
from minilm_sts.data.pairs import ReadOptions
from minilm_sts.data.token_cache import load_tokenized
from minilm_sts.errors import PairDataError


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def arrays(pairs) -> tuple:
    return (np.array(pairs.ids), np.array(pairs.offsets), np.array(pairs.labels), pairs.at_max_length,
            pairs.dropped)


def assert_same(first: tuple, second: tuple) -> None:
    for a, b in zip(first, second):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            assert a == b


def load_in(cache, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("MINILM_STS_CACHE", str(cache))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pairs = load_tokenized(*args, **kwargs)
        except PairDataError as err:
            return str(err), []
    return arrays(pairs), [str(w.message) for w in caught if "drop_invalid" in str(w.message)]


def as_format(tsv_path, suffix: str):
    """The same rows as a .jsonl or .parquet file."""
    import csv

    rows = list(csv.DictReader(open(tsv_path), delimiter="\t"))
    path = tsv_path.with_suffix(suffix)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("drop_invalid", [False, True])
def test_chunks_and_processes_give_the_arrays_of_one_chunk(tokenizer, pair_files, tmp_path, monkeypatch, suffix,
                                                          drop_invalid):
    path = pair_files["train"]
    if drop_invalid:  # bad rows in several chunks: the count and the first one named must not depend on chunks
        lines = path.read_text().splitlines()
        lines[5] = "\tb\t0.5"
        lines[17] = "a\tb\t7"
        lines[30] = "a\t \tnan"
        path.write_text("\n".join(lines) + "\n")
    path = path if suffix == ".tsv" else as_format(path, suffix)
    options = ReadOptions(drop_invalid=drop_invalid)
    whole = load_in(tmp_path / "whole", monkeypatch, str(path), tokenizer, 128, options, chunk_rows=10**6)
    assert not isinstance(whole[0], str) and whole[0][4] == (3 if drop_invalid else 0)
    for chunk_rows, num_proc in [(1, 1), (7, 1), (7, 2), (40, 2)]:
        chunked = load_in(tmp_path / f"chunks{chunk_rows}-{num_proc}", monkeypatch, str(path), tokenizer, 128,
                          options, chunk_rows=chunk_rows, num_proc=num_proc)
        assert_same(whole[0], chunked[0])
        assert chunked[1] == whole[1]  # the same drop_invalid warning, once
        assert not list((tmp_path / f"chunks{chunk_rows}-{num_proc}").glob("*.chunks-*"))  # chunks are removed


@pytest.mark.parametrize("bad", [{5: "\tb\t0.5", 30: "a\tb\tx"}, {33: "a\tb\t4"}, {2: "a\tb"}, {12: "a\tb\t0.5\t1"}])
def test_errors_are_the_same_in_chunks(tokenizer, pair_files, tmp_path, monkeypatch, bad):
    """Row problems are counted over the whole file, and a problem in the file's structure (a row with too few
    or too many fields) still wins over row problems before it, as when the file was read whole."""
    lines = pair_files["train"].read_text().splitlines()
    for number, line in bad.items():
        lines[number - 1] = line
    pair_files["train"].write_text("\n".join(lines) + "\n")
    path = str(pair_files["train"])
    whole, _ = load_in(tmp_path / "whole", monkeypatch, path, tokenizer, 128, chunk_rows=10**6)
    assert isinstance(whole, str) and str(min(bad)) in whole
    for chunk_rows in (1, 4, 16):
        assert load_in(tmp_path / f"c{chunk_rows}", monkeypatch, path, tokenizer, 128, chunk_rows=chunk_rows,
                       num_proc=2)[0] == whole
        assert not list((tmp_path / f"c{chunk_rows}").glob("*"))  # nothing kept of a source with bad rows


SLOW_PREPARATION = """
import sys, time
import minilm_sts.data.token_cache as token_cache
from transformers import AutoTokenizer

write = token_cache.write_chunk
def slow_write(*args):
    write(*args)
    print("chunk", flush=True)
    time.sleep(0.5)
token_cache.write_chunk = slow_write
token_cache.load_tokenized(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), 128, chunk_rows=4, num_proc=1)
"""


def test_interrupted_preparation_leaves_no_entry_and_resumes(tokenizer, tiny_model_dir, pair_files, tmp_path,
                                                             monkeypatch):
    path = str(pair_files["train"])  # 40 rows: 10 chunks of 4
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    process = subprocess.Popen([sys.executable, "-c", SLOW_PREPARATION, path, str(tiny_model_dir)],
                               stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # killed after 3 of 10 chunks
        assert process.stdout.readline() == "chunk\n"
    process.send_signal(signal.SIGKILL)
    process.wait()
    (chunk_folder,) = (tmp_path / "cache").glob("*.chunks-4")
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert entries == [chunk_folder]  # no entry, whole or half
    done = sorted(p.name for p in chunk_folder.iterdir() if not p.name.startswith("."))
    assert len(done) >= 3

    written = []
    write = token_cache.write_chunk
    monkeypatch.setattr(token_cache, "write_chunk", lambda folder, *a: (written.append(folder.name), write(folder, *a)))
    resumed = arrays(load_tokenized(path, tokenizer, 128, chunk_rows=4, num_proc=1))
    assert sorted(written) == [f"{i:07d}" for i in range(10) if f"{i:07d}" not in done]  # only the missing chunks
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cold"))
    assert_same(resumed, arrays(load_tokenized(path, tokenizer, 128, chunk_rows=4, num_proc=1)))


DISTRIBUTED_RANK = """
import json, os, sys
import numpy as np
import torch.distributed as dist
import minilm_sts.data.token_cache as token_cache
from transformers import AutoTokenizer

rank, world, port, path, model, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
machines = int(sys.argv[6])  # 2: each process on a machine of its own, with its own cache folder
if machines == 2:
    os.environ["MINILM_STS_CACHE"] += f"-{rank}"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
written = []
write = token_cache.write_chunk
token_cache.write_chunk = lambda folder, *args: (written.append(folder.name), write(folder, *args))
share = token_cache.Share(rank, world, rank if machines == 1 else 0, dist.barrier)
pairs = token_cache.load_tokenized(path, AutoTokenizer.from_pretrained(model), 128, chunk_rows=4, num_proc=1,
                                   share=share)
data = [np.asarray(pairs.ids).tolist(), np.asarray(pairs.offsets).tolist(), np.asarray(pairs.labels).tolist()]
json.dump({"written": written, "data": data}, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("machines", [1, 2])
def test_two_processes_prepare_one_source_together(tokenizer, tiny_model_dir, pair_files, tmp_path, monkeypatch,
                                                   machines):
    path, port = str(pair_files["train"]), str(free_port())
    env = {**os.environ, "MINILM_STS_CACHE": str(tmp_path / "cache")}
    ranks = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED_RANK, str(rank), port, path, str(tiny_model_dir),
                               str(tmp_path), str(machines)], env=env) for rank in range(2)]
    deadline = time.monotonic() + 120
    assert [rank.wait(timeout=max(1, deadline - time.monotonic())) for rank in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    evens, odds = [f"{i:07d}" for i in range(0, 10, 2)], [f"{i:07d}" for i in range(1, 10, 2)]
    if machines == 1:  # one cache folder: each process its share, no chunk twice
        assert results[0]["written"] == evens and results[1]["written"] == odds
    else:  # a cache folder each: each then tokenizes the chunks written on the other machine
        assert results[0]["written"] == evens + odds and results[1]["written"] == odds + evens
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "alone"))
    alone = load_tokenized(path, tokenizer, 128)
    expected = [np.asarray(alone.ids).tolist(), np.asarray(alone.offsets).tolist(), np.asarray(alone.labels).tolist()]
    assert results[0]["data"] == results[1]["data"] == expected


def test_a_streamed_hub_dataset_is_checked_and_prepared_in_chunks(tokenizer, pair_files, tmp_path, monkeypatch):
    import csv
    import types

    import datasets

    rows = list(csv.DictReader(open(pair_files["train"]), delimiter="\t"))
    hub = {"rows": rows}
    loads = []
    streamed_rows = datasets.IterableDataset.from_generator(lambda: iter(hub["rows"]))  # before `datasets` is faked

    def load_dataset(name, config, split, streaming=False):
        loads.append(streaming)
        return streamed_rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "cache"))
    hub["rows"] = [*rows[:25], {**rows[25], "label": "7"}, *rows[26:]]
    bad_label = r"hf\+stream:org/pairs:train, row 26, column 'label': expected a label"
    with pytest.warns(UserWarning, match="cached by name"), pytest.raises(PairDataError, match=bad_label):
        load_tokenized("hf+stream:org/pairs:train", tokenizer, 128, chunk_rows=8)
    hub["rows"] = rows
    with pytest.warns(UserWarning, match="a later change on the Hub is not seen"):
        streamed = arrays(load_tokenized("hf+stream:org/pairs:train", tokenizer, 128, chunk_rows=8, num_proc=1))
    assert loads and all(loads)  # streamed every time, never downloaded whole
    monkeypatch.setenv("MINILM_STS_CACHE", str(tmp_path / "from-file"))
    assert_same(streamed, arrays(load_tokenized(str(pair_files["train"]), tokenizer, 128)))


def test_the_default_process_count_shares_the_cpus_also_where_there_is_no_affinity(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert token_cache.ChunkTokenizers(None, 128, None, token_cache.Share(world=2)).num_proc == 4
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have none
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert token_cache.ChunkTokenizers(None, 128, None, token_cache.Share()).num_proc == 6
