"""Read labelled sentence pairs from a file or dataset and check every row before any training starts.

A source is a local `.csv`, `.tsv`, `.jsonl` or `.parquet` file (optionally `.gz` for the text formats), a
packaged dataset `builtin:NAME/SPLIT`, or a Hugging Face dataset `hf:NAME[:CONFIG]:SPLIT`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from minilm_sts.errors import UserInputError

SENTENCE_COLUMN_CHOICES = (("sentence_0", "sentence_1"), ("sentence1", "sentence2"))
LABEL_COLUMN_CHOICES = ("label", "score")
TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t"}


class PairDataError(UserInputError):
    """Bad input in a pair source; the message names the source, the row, the column and what was expected."""


@dataclass
class PairTable:
    source: str
    sentences_a: list[str]
    sentences_b: list[str]
    labels: list[float]
    columns: tuple[str, str, str] = ("sentence_0", "sentence_1", "label")
    dropped: int = 0  # invalid rows left out under drop_invalid

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawColumns:
    """Columns as read, before checks; `where(i)` says where row i sits in the source (e.g. 'line 12')."""

    columns: dict[str, list]
    where: Callable[[int], str]


def builtin_path(name: str) -> Path:
    """Packaged datasets, e.g. 'stsb/train' -> the shipped minilm_sts/data/stsb/train.tsv.gz."""
    path = Path(str(resources.files("minilm_sts") / "data" / f"{name}.tsv.gz"))
    if not path.is_file():
        raise PairDataError(f"no packaged dataset {name!r}; packaged: stsb/train, stsb/dev, stsb/test")
    return path


def local_path(source: str) -> Path | None:
    """The file behind a source, or None for remote (hf:) sources."""
    if source.startswith("hf:"):
        return None
    if source.startswith("builtin:"):
        return builtin_path(source.removeprefix("builtin:"))
    return Path(source).expanduser()


def read_pairs(
    source: str,
    sentence_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    label_scale: float = 1.0,
    drop_invalid: bool = False,
) -> PairTable:
    """Read and validate a pair source. None for a column argument means: recognise the usual names.

    A row with an empty sentence or a bad label is an error, unless `drop_invalid`: then such rows are left
    out, counted and reported in a warning. Structural problems (columns, quoting, encoding) always stop.
    """
    raw = _read_raw(source)
    if not raw.columns or not next(iter(raw.columns.values()), []):
        raise PairDataError(f"{source}: no data rows")
    col_a, col_b = _pick_sentence_columns(source, raw.columns, sentence_columns)
    label_col = _pick_label_column(source, raw.columns, label_column)
    sentences_a, bad_a = _check_sentences(source, raw, col_a)
    sentences_b, bad_b = _check_sentences(source, raw, col_b)
    labels, bad_labels = _check_labels(source, raw, label_col, label_scale)
    bad = {}
    for problems in (bad_a, bad_b, bad_labels):
        if problems and not drop_invalid:
            first = next(iter(problems.values()))
            raise PairDataError(f"{first} ({len(problems)} such row(s) in all){_scale_hint(labels, label_scale, problems is bad_labels)}")
        bad = {**problems, **bad}
    if bad:
        warnings.warn(f"{source}: dropped {len(bad)} invalid row(s) of {len(labels)} (drop_invalid); the first: "
                      f"{bad[min(bad)]}", stacklevel=2)
        keep = [i for i in range(len(labels)) if i not in bad]
        sentences_a, sentences_b, labels = ([column[i] for i in keep] for column in (sentences_a, sentences_b, labels))
    return PairTable(source, sentences_a, sentences_b, labels, (col_a, col_b, label_col), len(bad))


def read_sentences(source: str, column: str | None = None) -> list[str]:
    """Single sentences: a `.txt` file with one per line, or one column of a table (by default its only
    column, or `sentence`/`text`)."""
    path = local_path(source)
    if path is not None and path.suffix == ".txt":
        with open(path, encoding="utf-8-sig") as handle:
            raw = RawColumns({"line": [line.rstrip("\n") for line in handle]}, lambda i: f"line {i + 1}")
        column = "line"
    else:
        raw = _read_raw(source)
        if column is None:
            choices = [name for name in raw.columns if name in ("sentence", "text")] or list(raw.columns)
            if len(choices) != 1:
                raise PairDataError(f"{source}: which column holds the sentences? The columns are {list(raw.columns)}")
            column = choices[0]
        elif column not in raw.columns:
            raise PairDataError(f"{source}: column {column!r} not found; the columns are {list(raw.columns)}")
    if not raw.columns[column]:
        raise PairDataError(f"{source}: no sentences")
    return _checked_sentences(source, raw, column)


def read_unlabelled_pairs(source: str, sentence_columns: Sequence[str] | None = None) -> tuple[list[str], list[str]] | None:
    """The two sentence columns of `source`, or None when it has no recognisable pair of sentence columns."""
    raw = _read_raw(source)
    try:
        col_a, col_b = _pick_sentence_columns(source, raw.columns, sentence_columns)
    except PairDataError:
        if sentence_columns:
            raise
        return None
    return _checked_sentences(source, raw, col_a), _checked_sentences(source, raw, col_b)


def _pick_sentence_columns(source: str, columns: dict, wanted: Sequence[str] | None) -> tuple[str, str]:
    choices = [tuple(wanted)] if wanted else SENTENCE_COLUMN_CHOICES
    for pair in choices:
        if len(pair) != 2:
            raise PairDataError(f"sentence_columns must name exactly two columns, got {list(pair)}")
        if all(name in columns for name in pair):
            return pair
    expected = " or ".join(str(list(pair)) for pair in choices)
    raise PairDataError(f"{source}: sentence columns {expected} not found; the columns are {list(columns)}")


def _pick_label_column(source: str, columns: dict, wanted: str | None) -> str:
    choices = [wanted] if wanted else LABEL_COLUMN_CHOICES
    for name in choices:
        if name in columns:
            return name
    raise PairDataError(f"{source}: label column {' or '.join(choices)} not found; the columns are {list(columns)}")


def _check_sentences(source: str, raw: RawColumns, column: str) -> tuple[list, dict[int, str]]:
    """The column, and a message for each row that holds no sentence."""
    values = raw.columns[column]
    bad = {i: f"{source}, {raw.where(i)}, column {column!r}: expected a non-empty sentence, got {text!r}"
           for i, text in enumerate(values) if not isinstance(text, str) or not text.strip()}
    return values, bad


def _checked_sentences(source: str, raw: RawColumns, column: str) -> list[str]:
    values, bad = _check_sentences(source, raw, column)
    if bad:
        raise PairDataError(f"{next(iter(bad.values()))} ({len(bad)} such row(s) in all)")
    return values


def _check_labels(source: str, raw: RawColumns, column: str, scale: float) -> tuple[list[float], dict[int, str]]:
    """Labels divided by `scale`, and a message for each row whose label is not a number in [0, 1] after that."""
    if not (scale > 0 and math.isfinite(scale)):
        raise PairDataError(f"{source}: label_scale must be a positive number, got {scale}")
    labels, bad = [], {}
    for i, value in enumerate(raw.columns[column]):
        try:
            number = float(value) / scale
        except (TypeError, ValueError):
            number = math.nan
        labels.append(number)
        where = f"{source}, {raw.where(i)}, column {column!r}"
        if not math.isfinite(number):
            bad[i] = f"{where}: expected a finite number, got {value!r}"
        elif not 0.0 <= number <= 1.0:
            bad[i] = f"{where}: expected a label in [0, 1] after dividing by label_scale={scale:g}, got {value!r}"
    return labels, bad


def _scale_hint(labels: list[float], scale: float, about_labels: bool) -> str:
    top = max((y for y in labels if math.isfinite(y)), default=0.0) * scale
    if not about_labels or top <= 1:
        return ""
    return f". Labels reach {top:g}: set label_scale to {math.ceil(top):g} if that is the top of the scale."


def _read_raw(source: str) -> RawColumns:
    if source.startswith("hf:"):
        return _read_hf(source)
    path = local_path(source)
    if not path.is_file():
        raise PairDataError(f"{source}: file not found")
    suffixes = [s for s in path.suffixes[-2:] if s != ".gz"]
    suffix = suffixes[-1].lower() if suffixes else ""
    if suffix in TEXT_SUFFIXES:
        return _read_delimited(source, path, TEXT_SUFFIXES[suffix])
    if suffix == ".jsonl":
        return _read_jsonl(source, path)
    if suffix == ".parquet":
        return _read_parquet(source, path)
    raise PairDataError(f"{source}: unknown file type {path.suffix!r}; expected .csv, .tsv, .jsonl or .parquet")


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig drops a byte-order mark, which spreadsheet exports often add.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_delimited(source: str, path: Path, delimiter: str) -> RawColumns:
    lines: list[int] = []
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise PairDataError(f"{source}: the file is empty; expected a header line")
            _check_header(source, header)
            columns: dict[str, list] = {name: [] for name in header}
            lists = list(columns.values())
            for row in reader:
                if len(row) != len(header):
                    raise PairDataError(
                        f"{source}, line {reader.line_num}: expected {len(header)} fields as in the header, got "
                        f"{len(row)}; check the delimiter and the quoting of that row"
                    )
                for values, cell in zip(lists, row):
                    values.append(cell)
                lines.append(reader.line_num)
    except UnicodeDecodeError as err:
        raise PairDataError(f"{source}: not valid UTF-8 ({err}); re-save the file as UTF-8") from err
    except csv.Error as err:
        raise PairDataError(f"{source}: malformed CSV: {err}") from err
    return RawColumns(columns, lambda i: f"line {lines[i]}")


def _check_header(source: str, header: list[str]) -> None:
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise PairDataError(f"{source}, line 1: duplicate column name(s) {duplicates} in the header")


def _read_jsonl(source: str, path: Path) -> RawColumns:
    records = []
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PairDataError(f"{source}, line {number}: broken JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise PairDataError(f"{source}, line {number}: expected a JSON object, got {type(record).__name__}")
                records.append((number, record))
    except UnicodeDecodeError as err:
        raise PairDataError(f"{source}: not valid UTF-8 ({err}); re-save the file as UTF-8") from err
    names = list(dict.fromkeys(k for _, record in records for k in record))
    columns = {name: [record.get(name) for _, record in records] for name in names}
    return RawColumns(columns, lambda i: f"line {records[i][0]}")


def _read_parquet(source: str, path: Path) -> RawColumns:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise PairDataError(f"{source}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise PairDataError(f"{source}: unreadable Parquet file ({err})") from err
    return RawColumns(table.to_pydict(), lambda i: f"row {i + 1}")


def _read_hf(source: str) -> RawColumns:
    parts = source.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3):
        raise PairDataError(f"{source}: expected hf:NAME[:CONFIG]:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets
    except ImportError as err:
        raise PairDataError(f"{source}: Hugging Face datasets need the `datasets` package (pip install datasets)") from err
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all reported the same way
        raise PairDataError(f"{source}: could not load the Hugging Face dataset ({type(err).__name__}: {err})") from err
    return RawColumns(table.to_dict(), lambda i: f"row {i + 1}")
