"""Tokenize a pair source once and keep its token ids and labels on disk as flat numpy arrays, with two counts
(sentences that reached the max length, invalid rows dropped) and, for an n-tuple source, its sentences per row.

The cache key covers everything that decides the ids: the source's fingerprint (a file's bytes and the
format its name selects, or a Hub dataset's revision), the reading options, the tokenizer and the max length.
So a changed file or tokenizer never reuses stale ids, and a warm cache gives what a cold one would. Entries are
written to a temporary folder and renamed into place (`staged_folder`), so an interrupted write never leaves a half
entry behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import multiprocessing
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from minilm_sts.atomic import staged_folder
from minilm_sts.data.pairs import CHUNK_ROWS, PairTable, ReadOptions, iter_pair_chunks
from minilm_sts.data.sources import Source, parse_source
from minilm_sts.errors import PairDataError
from minilm_sts.model.tokenization import tokenize_texts, tokenizer_files, tokenizer_from_files

CACHE_FORMAT = 5  # 5: no sample rows or column names (a model card reads those from the source)
ARRAYS = ("ids", "offsets", "labels")
META = ("at_max_length", "dropped")


def cache_root() -> Path:
    return Path(os.environ.get("MINILM_STS_CACHE", Path.home() / ".cache" / "minilm_sts"))


@dataclass
class TokenizedPairs:
    """Row i has `columns` sentences (2 for a pair: A and B; 2 + k for an anchor, a positive and k negatives), and
    its sentence c, numbered columns * i + c, at ids[offsets[columns * i + c]:offsets[columns * i + c + 1]]."""

    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    at_max_length: int = 0  # sentences that reached the max length (and so were most likely truncated)
    dropped: int = 0  # invalid rows left out under drop_invalid
    columns: int = 2
    maps: list[mmap.mmap] = field(default_factory=list, repr=False, compare=False)  # of a cache entry's files

    def __len__(self) -> int:
        return len(self.labels)

    def release_pages(self) -> None:
        """Unmap the entry's pages that this process has read. They are clean pages of the page cache, but the
        kernel maps 64 KB around every read, so an epoch of random batches would otherwise show the whole entry
        in this process's resident memory. The next read maps them again from the page cache. (Windows has no
        such advice, and nothing is released there.)"""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for mapping in self.maps:
            mapping.madvise(mmap.MADV_DONTNEED)

    def sentence(self, k: int) -> np.ndarray:
        return self.ids[self.offsets[k] : self.offsets[k + 1]]


@dataclass(frozen=True)
class Share:
    """This process's part when several prepare one source (distributed training): process `rank` of `world`
    tokenizes chunks rank, rank + world, ...; after `barrier`, `local_rank` 0 of each machine assembles the
    entry, first tokenizing any chunk it cannot see (written on another machine that shares no cache folder)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] = lambda: None


def load_tokenized(source: str | Source, tokenizer, max_length: int, options: ReadOptions = ReadOptions(), *,
                   chunk_rows: int = CHUNK_ROWS, num_proc: int | None = None, share: Share = Share(),
                   **option_fields) -> TokenizedPairs:
    """Tokenized pairs for `source`, from the cache when an entry with the same key exists. `option_fields` set
    single fields of `options`, as in `load_tokenized(path, tokenizer, 128, label_scale=5.0)`.

    A source is read and tokenized `chunk_rows` pairs at a time, each chunk kept on disk as it is done, so memory
    does not grow with the source, and a preparation that was interrupted resumes from its last whole chunk.
    `num_proc` processes tokenize chunks side by side (None: the CPUs this process may use, shared among the
    processes of this machine under `share`; 1: all in this process). The entry is memory-mapped."""
    source, options = parse_source(source), replace(options, **option_fields)
    entry = cache_root() / _cache_key(source, tokenizer, max_length, options)
    pairs = _read_entry(entry)
    if pairs is None:
        _prepare(entry, ChunkFolder(entry, chunk_rows), source, options, tokenizer, max_length, num_proc, share)
        pairs = _read_entry(entry)
    if pairs is None:
        raise OSError(f"{entry}: the token cache entry for {source.text} was not written whole")
    return pairs


def _prepare(entry: Path, chunks: "ChunkFolder", source: Source, options: ReadOptions, tokenizer, max_length: int,
             num_proc: int | None, share: Share) -> None:
    try:
        chunks.tokenize(source, options, tokenizer, max_length, num_proc, share)
        share.barrier()
        if share.local_rank == 0:
            if chunks.missing():  # written on another machine, to a cache folder that this one cannot see
                chunks.tokenize(source, options, tokenizer, max_length, num_proc, Share())
            chunks.assemble()
    except PairDataError:
        chunks.remove()  # a source with bad rows is fixed by changing it, which changes its key
        raise
    share.barrier()  # every machine's entry is whole: no process reads the chunks any more
    if share.local_rank == 0:
        chunks.remove()


class ChunkFolder:
    """Chunk i of a source, tokenized, in its own folder beside the entry it will become: token ids, sentence
    lengths, labels and counts. Each chunk folder appears whole or not at all."""

    def __init__(self, entry: Path, chunk_rows: int):
        self.entry, self.chunk_rows = entry, chunk_rows
        self.folder = entry.with_name(f"{entry.name}.chunks-{chunk_rows}")
        self.count = 0

    def part(self, index: int) -> Path:
        return self.folder / f"{index:07d}"

    def missing(self) -> bool:
        return not all(self.part(index).is_dir() for index in range(self.count))

    def tokenize(self, source: Source, options: ReadOptions, tokenizer, max_length: int, num_proc: int | None,
                 share: Share) -> None:
        """Tokenize this process's chunks that are not on disk yet (all chunks are read: a chunk's rows are
        known only by reading those before it, and every row is checked)."""
        with ChunkTokenizers(tokenizer, max_length, num_proc, share) as workers:
            for index, table in enumerate(tqdm(iter_pair_chunks(source, options, self.chunk_rows),
                                               desc=f"Tokenizing {source.text}", unit=" chunks",
                                               disable=share.rank != 0 or None, leave=False)):
                if index % share.world == share.rank and not self.part(index).is_dir():
                    workers.submit(self.part(index), table)
                self.count = index + 1

    def assemble(self) -> None:
        """Write the chunks end to end as the entry's arrays, one chunk in memory at a time. Plain writes, not
        a writable memory map: the pages of a mapped file count in this process's resident memory as it fills."""
        metas = [json.loads((self.part(i) / "meta.json").read_text()) for i in range(self.count)]
        pairs, tokens = sum(m["pairs"] for m in metas), sum(m["tokens"] for m in metas)
        columns = metas[0].get("columns", 2)
        id_type = np.load(self.part(0) / "ids.npy", mmap_mode="r").dtype
        shapes = {"ids": (id_type, tokens), "offsets": (np.int64, columns * pairs + 1), "labels": (np.float32, pairs)}
        with staged_folder(self.entry, replace=False) as staging, ExitStack() as files:
            out = {name: files.enter_context(_npy_writer(staging / f"{name}.npy", *shape))
                   for name, shape in shapes.items()}
            out["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
            token = 0
            for index in range(self.count):
                part = self.part(index)
                chunk_ids, lengths = np.load(part / "ids.npy"), np.load(part / "lengths.npy")
                out["ids"].write(chunk_ids.tobytes())
                out["offsets"].write((token + np.cumsum(lengths, dtype=np.int64)).tobytes())
                out["labels"].write(np.load(part / "labels.npy").tobytes())
                token += len(chunk_ids)
            files.close()
            meta = {"pairs": pairs, **{key: sum(m[key] for m in metas) for key in META}, **_columns_item(columns)}
            (staging / "meta.json").write_text(json.dumps(meta))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ChunkTokenizers:
    """Tokenizes chunks into their folders: in this process, or, from a second chunk on, in a pool of `num_proc`
    processes with at most two chunks each in flight, so memory stays bounded."""

    def __init__(self, tokenizer, max_length: int, num_proc: int | None, share: Share):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.num_proc = num_proc or max(1, _usable_cpus() // _processes_per_machine(share))
        self.pool: ProcessPoolExecutor | None = None
        self.pending: set[Future] = set()
        self.held: tuple[Path, PairTable] | None = None  # a first chunk, kept until a second shows a pool pays

    def __enter__(self) -> "ChunkTokenizers":
        return self

    def submit(self, folder: Path, table: PairTable) -> None:
        if self.num_proc == 1:
            write_chunk(folder, table, self.tokenizer, self.max_length)
        elif self.pool is None and self.held is None:
            self.held = (folder, table)
        else:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.num_proc, mp_context=_worker_context(),
                                                initializer=_start_worker,
                                                initargs=(tokenizer_files(self.tokenizer), self.max_length))
                self._send(*self.held)
                self.held = None
            self._send(folder, table)

    def _send(self, folder: Path, table: PairTable) -> None:
        if len(self.pending) >= 2 * self.num_proc:
            done, self.pending = wait(self.pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # a worker's error, raised here
        self.pending.add(self.pool.submit(_worker_write_chunk, folder, table))

    def __exit__(self, error_type, *_) -> None:
        if self.held is not None and error_type is None:  # the only chunk: not worth starting processes
            write_chunk(*self.held, self.tokenizer, self.max_length)
        if self.pool is not None:
            try:
                for future in wait(self.pending).done:
                    future.result()
            finally:
                self.pool.shutdown(cancel_futures=True)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Forked where the system can, as DataLoader workers are: a spawned process imports the caller's main
    module again, which breaks any script without an `if __name__ == "__main__"` guard. The forked processes
    would warn that the tokenizer's own thread pool was used before the fork; they do not use it, and this
    process's later tokenizing runs without it (a small part of its work)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return multiprocessing.get_context("fork")


@contextmanager
def _npy_writer(path: Path, dtype, length: int) -> Iterator[BinaryIO]:
    """A file to write a 1-d array of `length` items of `dtype` into, in pieces: the header np.save writes for
    such an array, then the items as raw bytes."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        start = handle.tell()
        yield handle
        written, expected = handle.tell() - start, length * np.dtype(dtype).itemsize
        if written != expected:  # chunks that disagree with their counts: never an entry
            raise OSError(f"{path}: wrote {written:,} bytes of items where the header says {expected:,}")


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system has one: Linux, not macOS or Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _processes_per_machine(share: Share) -> int:
    """Processes of this run on this machine, which share its CPUs (torchrun and Lightning set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", share.world)))


def write_chunk(folder: Path, table: PairTable, tokenizer, max_length: int) -> None:
    interleaved = [text for row in zip(*table.sentence_columns()) for text in row]
    ids, offsets, at_limit = tokenize_texts(tokenizer, interleaved, max_length)
    # replace=False: another process may have written the same chunk first; its content is the same.
    with staged_folder(folder, replace=False) as staging:
        np.save(staging / "ids.npy", ids)
        np.save(staging / "lengths.npy", np.diff(offsets).astype(np.int32))
        np.save(staging / "labels.npy", np.asarray(table.labels, dtype=np.float32))
        meta = {"pairs": len(table), "tokens": len(ids), "at_max_length": at_limit, "dropped": table.dropped,
                **_columns_item(table.width)}
        (staging / "meta.json").write_text(json.dumps(meta))


def _columns_item(columns: int) -> dict:
    """The meta.json item for the sentences per row: none for pairs, so that a pair set's entry is byte for byte
    what it was before n-tuples (a meta.json without it means 2)."""
    return {} if columns == 2 else {"columns": columns}


_worker: dict = {}  # in a pool process: its tokenizer and max length


def _start_worker(files: dict[str, str], max_length: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool's processes are the parallelism
    _worker.update(tokenizer=tokenizer_from_files(files), max_length=max_length)


def _worker_write_chunk(folder: Path, table: PairTable) -> None:
    write_chunk(folder, table, _worker["tokenizer"], _worker["max_length"])


def _cache_key(source: Source, tokenizer, max_length: int, options: ReadOptions) -> str:
    key = {"cache_format": CACHE_FORMAT, "source": source.fingerprint(), "read": asdict(options),
           "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": max_length}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's definition without its call-time state: a call with truncation=True stores the
    truncation settings inside the backend tokenizer, which must not change the cache key."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _npy_array(mapping: mmap.mmap) -> np.ndarray:
    """The 1-d array of a mapped .npy file (as np.save writes one), read in place."""
    header = io.BytesIO(mapping[:4096])
    version = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    (length,), _, dtype = read_header(header)
    return np.frombuffer(mapping, dtype=dtype, count=length, offset=header.tell())


def _read_entry(entry: Path) -> TokenizedPairs | None:
    """The cached pairs, or None when absent or damaged (a damaged entry is removed and rebuilt)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        maps = {name: _map_file(entry / f"{name}.npy") for name in ARRAYS}
        arrays = {name: _npy_array(mapping) for name, mapping in maps.items()}
        pairs = TokenizedPairs(**arrays, **{key: meta[key] for key in META}, columns=meta.get("columns", 2),
                               maps=list(maps.values()))
        consistent = (len(pairs.offsets) == pairs.columns * len(pairs) + 1 and pairs.offsets[-1] == len(pairs.ids)
                      and meta["pairs"] == len(pairs))
    except (OSError, ValueError, KeyError):
        consistent = False
    if not consistent:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return pairs
