"""Where pairs come from: a local file, a packaged dataset `builtin:NAME/SPLIT`, or a Hugging Face dataset
`hf:NAME[:CONFIG]:SPLIT`, downloaded whole, or `hf+stream:NAME[:CONFIG]:SPLIT`, streamed.

`parse_source` turns what the user wrote into a source. Every source has `text` (what the user wrote, used in
messages), `name` (a short name for metric keys) and `fingerprint()`: everything about the source that decides
what reading it yields, which the token cache keys on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Union

from minilm_sts._compat import hf_dataset_fingerprint
from minilm_sts.errors import PairDataError

ACCEPTED = ("a .csv, .tsv, .jsonl or .parquet file (.csv.gz, .tsv.gz, .jsonl.gz too), builtin:stsb/SPLIT, "
            "hf:NAME[:CONFIG]:SPLIT or hf+stream:NAME[:CONFIG]:SPLIT")
HF_PREFIXES = ("hf:", "hf+stream:")


@dataclass(frozen=True)
class FileSource:
    """A local file, or a file shipped inside the package (`builtin:`)."""

    text: str
    path: Path
    name: str

    @property
    def format(self) -> str:
        """What the file name says the file is, which selects its reader: 'tsv' for pairs.tsv and pairs.tsv.gz."""
        suffixes = [s for s in self.path.suffixes[-2:] if s != ".gz"]
        return suffixes[-1].lower().removeprefix(".") if suffixes else ""

    @property
    def compressed(self) -> bool:
        return self.path.suffix == ".gz"

    def existing_path(self) -> Path:
        """The path, once it is known to be a file."""
        if self.path.is_dir():
            raise PairDataError(f"{self.text} is a directory, not a file; expected {ACCEPTED}")
        if not self.path.is_file():
            raise PairDataError(f"{self.text}: file not found; expected {ACCEPTED}")
        return self.path

    def fingerprint(self) -> str:
        """The file's bytes and the format its name selects: the same bytes named .csv and .tsv read differently."""
        digest = hashlib.sha256(f"file:{self.format}:".encode())
        with open(self.existing_path(), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


@dataclass(frozen=True)
class HfSource:
    """A split of a Hugging Face dataset, loaded (at most once per source) through the `datasets` package; with
    `streaming`, read row batch by row batch from the Hub, never copied whole to disk."""

    text: str
    dataset: str
    config: str | None
    split: str
    streaming: bool = False

    @property
    def name(self) -> str:
        return self.text.split(":", 1)[1].replace("/", "-").replace(":", "-")

    @cached_property
    def table(self):
        """The loaded split, a `datasets.Dataset`."""
        try:
            import datasets
        except ImportError as err:
            raise PairDataError(f"{self.text}: Hugging Face datasets need the `datasets` package "
                                "(pip install datasets)") from err
        try:
            if self.streaming:
                return datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
            return datasets.load_dataset(self.dataset, self.config, split=self.split)
        except Exception as err:  # offline, unknown name, unknown split: all reported the same way
            raise PairDataError(f"{self.text}: could not load the Hugging Face dataset "
                                f"({type(err).__name__}: {err})") from err

    def fingerprint(self) -> str:
        """Name, config, split and the loaded dataset's own fingerprint, which changes with the revision it was
        built from, so an updated Hub dataset is read again. A streamed dataset has none: it is keyed by name
        alone, and a warning says what that costs."""
        if self.streaming:
            warnings.warn(f"{self.text}: a streamed dataset has no content fingerprint, so its tokens are cached "
                          "by name: a later change on the Hub is not seen until its entry is deleted from the token "
                          "cache (MINILM_STS_CACHE); use hf: to key it by content", stacklevel=2)
            return json.dumps(["hf+stream", self.dataset, self.config, self.split])
        return json.dumps(["hf", self.dataset, self.config, self.split, hf_dataset_fingerprint(self.table)])


Source = Union[FileSource, HfSource]


def parse_source(source: str | Source) -> Source:
    """The source that `source` names; a source already parsed passes through unchanged."""
    if not isinstance(source, str):
        return source
    if source.startswith(HF_PREFIXES):
        prefix, rest = source.split(":", 1)
        parts = rest.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise PairDataError(f"{source}: expected {prefix}:NAME[:CONFIG]:SPLIT")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        return HfSource(source, name, config, split, streaming=prefix == "hf+stream")
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        return FileSource(source, builtin_path(name), name.replace("/", "-"))
    path = Path(source).expanduser()
    return FileSource(source, path, path.name.split(".")[0] or path.name)


def builtin_path(name: str) -> Path:
    """Packaged datasets, e.g. 'stsb/train' -> the shipped minilm_sts/data/stsb/train.tsv.gz."""
    path = Path(str(resources.files("minilm_sts") / "data" / f"{name}.tsv.gz"))
    if not path.is_file():
        raise PairDataError(f"no packaged dataset {name!r}; packaged: stsb/train, stsb/dev, stsb/test")
    return path
