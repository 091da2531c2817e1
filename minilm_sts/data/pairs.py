"""Read labelled sentence pairs from a source (see `minilm_sts.data.sources`) and check every row before any
training starts.

A local file is read by the reader its name selects: `.csv`, `.tsv`, `.jsonl` or `.parquet` (optionally `.gz`
for the text formats). `ReadOptions` holds every other choice about reading, so the token cache can key on it
whole.

Over 300 lines because every row check sits beside the reader whose rows it checks, so one file says what
is accepted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from itertools import islice
from typing import Callable, Optional, Sequence

from minilm_sts.data.sources import FileSource, HfSource, Source, parse_source
from minilm_sts.errors import PairDataError

SENTENCE_COLUMN_CHOICES = (("sentence_0", "sentence_1"), ("sentence1", "sentence2"))
LABEL_COLUMN_CHOICES = ("label", "score")
DELIMITERS = {"csv": ",", "tsv": "\t"}
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line ends a text file opened with newline="" splits on


@dataclass(frozen=True)
class ReadOptions:
    """How to read a pair source besides its format. None for a column means: recognise the usual names.

    A row with an empty sentence or a bad label is an error, unless `drop_invalid`: then such rows are left
    out, counted and reported in a warning. Structural problems (columns, quoting, encoding) always stop.
    """

    sentence_columns: Optional[tuple[str, ...]] = None
    label_column: Optional[str] = None
    label_scale: float = 1.0
    drop_invalid: bool = False

    def __post_init__(self):
        # A config gives a list (or an empty one for "recognise"); a tuple keeps the options hashable.
        object.__setattr__(self, "sentence_columns", tuple(self.sentence_columns) if self.sentence_columns else None)


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


def read_pairs(source: str | Source, options: ReadOptions = ReadOptions(), **option_fields) -> PairTable:
    """Read and validate a pair source. `option_fields` set single fields of `options`, as in
    `read_pairs(path, label_scale=5.0)`."""
    source, options = parse_source(source), replace(options, **option_fields)
    raw = _read_raw(source)
    text = source.text
    if not raw.columns or not next(iter(raw.columns.values()), []):
        raise PairDataError(f"{text}: no data rows")
    col_a, col_b = _pick_sentence_columns(text, raw.columns, options.sentence_columns)
    label_col = _pick_label_column(text, raw.columns, options.label_column)
    sentences_a, bad_a = _check_sentences(text, raw, col_a)
    sentences_b, bad_b = _check_sentences(text, raw, col_b)
    labels, bad_labels = _check_labels(text, raw, label_col, options.label_scale)
    bad = {}
    for problems in (bad_a, bad_b, bad_labels):
        if problems and not options.drop_invalid:
            first = next(iter(problems.values()))
            hint = _scale_hint(labels, options.label_scale, problems is bad_labels)
            raise PairDataError(f"{first} ({len(problems)} such row(s) in all){hint}")
        bad = {**problems, **bad}
    if bad:
        warnings.warn(f"{text}: dropped {len(bad)} invalid row(s) of {len(labels)} (drop_invalid); the first: "
                      f"{bad[min(bad)]}", stacklevel=2)
        keep = [i for i in range(len(labels)) if i not in bad]
        sentences_a, sentences_b, labels = ([column[i] for i in keep] for column in (sentences_a, sentences_b, labels))
    return PairTable(text, sentences_a, sentences_b, labels, (col_a, col_b, label_col), len(bad))


def is_sentence_file(source: Source) -> bool:
    """A `.txt` file: one sentence per line."""
    return isinstance(source, FileSource) and source.format == "txt"


def read_sentences(source: str | Source, column: str | None = None) -> list[str]:
    """Single sentences: a `.txt` file with one per line, or one column of a table (by default its only
    column, or `sentence`/`text`)."""
    source = parse_source(source)
    if is_sentence_file(source):
        raw, column = _read_lines(source), "line"
    else:
        raw = _read_raw(source)
        if column is None:
            choices = [name for name in raw.columns if name in ("sentence", "text")] or list(raw.columns)
            if len(choices) != 1:
                raise PairDataError(f"{source.text}: which column holds the sentences? "
                                    f"The columns are {list(raw.columns)}")
            column = choices[0]
        elif column not in raw.columns:
            raise PairDataError(f"{source.text}: column {column!r} not found; the columns are {list(raw.columns)}")
    if not raw.columns[column]:
        raise PairDataError(f"{source.text}: no sentences")
    return _checked_sentences(source.text, raw, column)


def read_unlabelled_pairs(source: str | Source,
                          sentence_columns: Sequence[str] | None = None) -> tuple[list[str], list[str]] | None:
    """The two sentence columns of `source`, or None when it has no recognisable pair of sentence columns."""
    source = parse_source(source)
    raw = _read_raw(source)
    try:
        col_a, col_b = _pick_sentence_columns(source.text, raw.columns, sentence_columns)
    except PairDataError:
        if sentence_columns:
            raise
        return None
    return _checked_sentences(source.text, raw, col_a), _checked_sentences(source.text, raw, col_b)


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


def _read_raw(source: Source) -> RawColumns:
    if isinstance(source, HfSource):
        return RawColumns(source.table.to_dict(), lambda i: f"row {i + 1}")
    path = source.existing_path()
    if source.format in DELIMITERS:
        return _read_delimited(source, DELIMITERS[source.format])
    if source.format == "jsonl":
        return _read_jsonl(source)
    if source.format == "parquet":
        return _read_parquet(source)
    raise PairDataError(f"{source.text}: unknown file type {path.suffix!r}; expected .csv, .tsv, .jsonl or .parquet")


def _open_bytes(source: FileSource) -> io.BufferedIOBase:
    path = source.existing_path()
    return gzip.open(path, "rb") if source.compressed else open(path, "rb")


def _open_text(source: FileSource) -> io.TextIOBase:
    # utf-8-sig drops a byte-order mark, which spreadsheet exports often add.
    return io.TextIOWrapper(_open_bytes(source), encoding="utf-8-sig", newline="")


def _not_utf8(source: FileSource) -> PairDataError:
    """Say which line holds the first bytes that are not UTF-8. The decoder reads ahead in blocks, so its
    error knows only an offset in a block; lines are decoded one by one here instead (a line break byte is
    never part of a multi-byte character, so each line decodes on its own)."""
    with _open_bytes(source) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return PairDataError(
                    f"{source.text}, line {number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte "
                    f"{err.start + 1} of the line: {err.reason}); re-save the file as UTF-8"
                )
    raise AssertionError(f"{source.text}: the decoder failed but every line decodes")


def _read_lines(source: FileSource) -> RawColumns:
    try:
        with _open_text(source) as handle:
            lines = [line.rstrip("\r\n") for line in handle]
    except UnicodeDecodeError as err:
        raise _not_utf8(source) from err
    return RawColumns({"line": lines}, lambda i: f"line {i + 1}")


def _read_delimited(source: FileSource, delimiter: str) -> RawColumns:
    lines: list[int] = []  # the line each row ends on
    header_end = 0
    try:
        with _open_text(source) as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise PairDataError(f"{source.text}: the file is empty; expected a header line")
            _check_header(source.text, header)
            header_end = reader.line_num
            columns: dict[str, list] = {name: [] for name in header}
            lists = list(columns.values())
            for row in reader:
                if len(row) != len(header):
                    raise PairDataError(
                        f"{source.text}, line {reader.line_num}: expected {len(header)} fields as in the header, got "
                        f"{len(row)}; check the delimiter and the quoting of that row"
                    )
                for values, cell in zip(lists, row):
                    values.append(cell)
                lines.append(reader.line_num)
    except UnicodeDecodeError as err:
        raise _not_utf8(source) from err
    except csv.Error as err:
        row_start = (lines[-1] if lines else header_end) + 1
        if "unexpected end of data" not in str(err):
            raise PairDataError(f"{source.text}, line {reader.line_num}: malformed CSV ({err})") from err
        raise PairDataError(
            f"{source.text}, line {_unclosed_quote_line(source, delimiter, row_start)}: a quoted field opens here and "
            "is never closed, so it runs to the end of the file; close the quote, or quote the whole field and "
            'double each quote inside it ("")'
        ) from err
    return RawColumns(columns, lambda i: f"line {lines[i]}")


def _unclosed_quote_line(source: FileSource, delimiter: str, row_start: int) -> int:
    """The line where the quoted field that runs to the end of the file opens. Read without `strict` from the
    start of its row, that field comes back as the row's last, so the line breaks inside the fields before it
    count the lines from the row's start to the quote."""
    with _open_text(source) as handle:
        row = next(csv.reader(islice(handle, row_start - 1, None), delimiter=delimiter))
    return row_start + sum(len(LINE_BREAK.findall(field)) for field in row[:-1])


def _check_header(text: str, header: list[str]) -> None:
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise PairDataError(f"{text}, line 1: duplicate column name(s) {duplicates} in the header")


def _read_jsonl(source: FileSource) -> RawColumns:
    records = []
    try:
        with _open_text(source) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PairDataError(f"{source.text}, line {number}: broken JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise PairDataError(f"{source.text}, line {number}: expected a JSON object, "
                                        f"got {type(record).__name__}")
                records.append((number, record))
    except UnicodeDecodeError as err:
        raise _not_utf8(source) from err
    names = list(dict.fromkeys(k for _, record in records for k in record))
    columns = {name: [record.get(name) for _, record in records] for name in names}
    return RawColumns(columns, lambda i: f"line {records[i][0]}")


def _read_parquet(source: FileSource) -> RawColumns:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise PairDataError(f"{source.text}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:
        table = pq.read_table(source.path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise PairDataError(f"{source.text}: unreadable Parquet file ({err})") from err
    return RawColumns(table.to_pydict(), lambda i: f"row {i + 1}")
