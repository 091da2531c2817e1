"""Read labelled sentence pairs from a source (see `minilm_sts.data.sources`) and check every row before any
training starts.

A local file is read by the reader its name selects: `.csv`, `.tsv`, `.jsonl` or `.parquet` (optionally `.gz`
for the text formats). `ReadOptions` holds every other choice about reading, so the token cache can key on it
whole.

A source is a set of labelled pairs (two sentence columns and a label), or of n-tuples as sentence-transformers
writes them (`anchor, positive` and any negatives `negative` or `negative_1 .. negative_k`), whose rows are all
positive pairs (label 1.0) unless the source has a label column.

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
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from typing import Callable, Iterator, Optional, Sequence

from minilm_sts.data.sources import FileSource, HfSource, Source, parse_source
from minilm_sts.errors import PairDataError

SENTENCE_COLUMN_CHOICES = (("sentence_0", "sentence_1"), ("sentence1", "sentence2"))
TUPLE_COLUMNS = ("anchor", "positive")  # then "negative", or "negative_1" .. "negative_k"
LABEL_COLUMN_CHOICES = ("label", "score")
DELIMITERS = {"csv": ",", "tsv": "\t"}
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line ends a text file opened with newline="" splits on
CHUNK_ROWS = 65536  # rows a chunked read holds at once: about 20 MB of Quora-like pairs
STREAMED_WHOLE = 1 << 40  # a batch size that takes a whole streamed dataset in one batch


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
    """Rows of a source: sentences A and B, for an n-tuple source each negative column's sentences too, and labels
    (1.0 for every row of an n-tuple source without a label column). `columns` names the sentence columns, then
    the label column if the source has one."""

    source: str
    sentences_a: list[str]
    sentences_b: list[str]
    labels: list[float]
    columns: tuple[str, ...] = ("sentence_0", "sentence_1", "label")
    dropped: int = 0  # invalid rows left out under drop_invalid
    negatives: list[list[str]] = field(default_factory=list)  # one list per negative column

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def width(self) -> int:
        """Sentences per row: 2 for a pair, 2 + k for an anchor, a positive and k negatives."""
        return 2 + len(self.negatives)

    @property
    def label_column(self) -> str | None:
        return self.columns[self.width] if len(self.columns) > self.width else None

    def sentence_columns(self) -> list[list[str]]:
        return [self.sentences_a, self.sentences_b, *self.negatives]


@dataclass
class RawColumns:
    """Columns as read, before checks, for all rows or one chunk of them; `where(i)` says where row i of these
    sits in the source (e.g. 'line 12')."""

    columns: dict[str, list]
    where: Callable[[int], str]

    @property
    def size(self) -> int:
        return len(next(iter(self.columns.values()), []))


def read_pairs(source: str | Source, options: ReadOptions = ReadOptions(), **option_fields) -> PairTable:
    """Read and validate a pair source. `option_fields` set single fields of `options`, as in
    `read_pairs(path, label_scale=5.0)`."""
    chunks = list(iter_pair_chunks(source, replace(options, **option_fields), chunk_rows=None))
    first = chunks[0]
    a, b, *negatives = ([text for chunk in chunks for text in chunk.sentence_columns()[c]] for c in range(first.width))
    return PairTable(first.source, a, b, [label for chunk in chunks for label in chunk.labels], first.columns,
                     sum(chunk.dropped for chunk in chunks), negatives)


def iter_pair_chunks(source: str | Source, options: ReadOptions = ReadOptions(),
                     chunk_rows: int | None = CHUNK_ROWS) -> Iterator[PairTable]:
    """The valid pairs of `source` in chunks, chunk i from source rows i * chunk_rows up to (i + 1) * chunk_rows
    (one chunk when `chunk_rows` is None), so memory holds one chunk at a time.

    Every problem is reported as `read_pairs` always did: after the whole source is read, with the first bad
    row, the number of such rows and, under `drop_invalid`, one warning for all. So from the first bad row on
    (unless `drop_invalid`), no more chunks are yielded, the rest is only checked, and the generator raises at
    its end: a caller must not use what it was given before that. Chunk i is always the i-th yielded (empty
    when every row of it was dropped), so a caller may key work it has done on i."""
    source = parse_source(source)
    chunks = _raw_chunks(source, chunk_rows)
    first = next(chunks)
    try:
        sentence_columns = _pick_sentence_columns(source.text, first.columns, options.sentence_columns)
        columns = (sentence_columns, _pick_label_column(source.text, first.columns, options.label_column,
                                                        optional=is_tuple_set(sentence_columns)))
        _check_label_scale(source.text, options.label_scale)
    except PairDataError as err:
        columns, setup_error = None, err  # said after the whole source is read, as before chunks existed
    problems, rows = _RowProblems(source.text, options), 0
    for raw in chain([first], chunks):
        rows += raw.size
        table = problems.check(raw, *columns) if columns else None
        if table is not None and (options.drop_invalid or not problems.found):
            yield table
    if rows == 0:
        raise PairDataError(f"{source.text}: no data rows")
    if columns is None:
        raise setup_error
    problems.raise_or_warn()


class _RowProblems:
    """What was wrong with a source's rows so far, chunk by chunk: for each check (each sentence column, then the
    label) the first message and a count, and for `drop_invalid` the first bad row's message and the count."""

    def __init__(self, source: str, options: ReadOptions):
        self.source, self.options = source, options
        self.rows, self.found, self.top_label = 0, False, 0.0
        self.first: list[str | None] = []
        self.counts: list[int] = []
        self.first_dropped, self.dropped = None, 0

    def check(self, raw: RawColumns, sentence_columns: tuple[str, ...], label_column: str | None) -> PairTable:
        """The chunk's valid rows (empty once a problem has been found, unless drop_invalid)."""
        checked = [_check_sentences(self.source, raw, name) for name in sentence_columns]
        if label_column is None:  # an n-tuple source without labels: every row is a positive pair
            labels, bad_labels = [1.0] * raw.size, {}
        else:
            labels, bad_labels = _check_labels(self.source, raw, label_column, self.options.label_scale)
        self.rows += len(labels)
        self.top_label = max([self.top_label, *(y for y in labels if math.isfinite(y))])
        every_check = [bad for _, bad in checked] + [bad_labels]
        if not self.counts:
            self.first, self.counts = [None] * len(every_check), [0] * len(every_check)
        bad: dict[int, str] = {}
        # A row with several problems is named by its first bad column's problem, the label's last.
        for kind in reversed(range(len(every_check))):
            problems = every_check[kind]
            self.counts[kind] += len(problems)
            if problems and self.first[kind] is None:
                self.first[kind] = next(iter(problems.values()))
            bad.update(problems)
        self.found = self.found or bool(bad)
        self.dropped += len(bad)
        if bad and self.first_dropped is None:
            self.first_dropped = bad[min(bad)]
        kept = [values for values, _ in checked] + [labels]
        if bad:
            keep = [i for i in range(len(labels)) if i not in bad]
            kept = [[column[i] for i in keep] for column in kept]
        (a, b, *negatives), labels = kept[:-1], kept[-1]
        return PairTable(self.source, a, b, labels, (*sentence_columns, *filter(None, [label_column])), len(bad),
                         negatives)

    def raise_or_warn(self) -> None:
        for kind, first in enumerate(self.first):
            if first is not None and not self.options.drop_invalid:
                hint = _scale_hint(self.top_label, self.options.label_scale, about_labels=kind == len(self.first) - 1)
                raise PairDataError(f"{first} ({self.counts[kind]} such row(s) in all){hint}")
        if self.dropped:
            warnings.warn(f"{self.source}: dropped {self.dropped} invalid row(s) of {self.rows} (drop_invalid); the "
                          f"first: {self.first_dropped}", stacklevel=2)


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


def column_names(source: str | Source) -> list[str]:
    """The names of the source's columns (the source is read whole)."""
    return list(_read_raw(parse_source(source)).columns)


def read_unlabelled_pairs(source: str | Source,
                          sentence_columns: Sequence[str] | None = None) -> tuple[list[str], list[str]] | None:
    """The first two sentence columns of `source` (of an n-tuple source, its anchors and positives), or None when
    it has no recognisable sentence columns."""
    source = parse_source(source)
    raw = _read_raw(source)
    if sentence_columns is not None and len(sentence_columns) != 2:
        raise PairDataError(f"sentence_columns must name exactly two columns, got {list(sentence_columns)}")
    try:
        col_a, col_b, *_ = _pick_sentence_columns(source.text, raw.columns, sentence_columns)
    except PairDataError:
        if sentence_columns:
            raise
        return None
    return _checked_sentences(source.text, raw, col_a), _checked_sentences(source.text, raw, col_b)


def read_id_columns(source: str | Source, names: Sequence[str]) -> list[list[str]]:
    """Columns of ids beside the sentences (question ids, say), each id a whole number or a non-empty text, given
    as text: 7 in a JSON line and "7" in a TSV cell are one id."""
    source = parse_source(source)
    raw = _read_raw(source)
    missing = [name for name in names if name not in raw.columns]
    if missing:
        raise PairDataError(f"{source.text}: id columns {missing} not found; the columns are {list(raw.columns)}")
    columns = []
    for name in names:
        values = raw.columns[name]
        bad = [i for i, value in enumerate(values) if not _is_id(value)]
        if bad:
            raise PairDataError(f"{source.text}, {raw.where(bad[0])}, column {name!r}: expected an id (a whole number "
                                f"or a non-empty text), got {values[bad[0]]!r} ({len(bad)} such row(s) in all)")
        columns.append([str(value).strip() for value in values])
    return columns


def _is_id(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int) and not isinstance(value, bool)


def is_tuple_set(sentence_columns: Sequence[str]) -> bool:
    """Whether these are an n-tuple source's columns (anchor, positive and negatives), whose rows are all positive
    pairs unless the source has a label column."""
    return tuple(sentence_columns[:2]) == TUPLE_COLUMNS or len(sentence_columns) > 2


def _pick_sentence_columns(source: str, columns: dict, wanted: Sequence[str] | None) -> tuple[str, ...]:
    """The columns asked for (two, or more: anchor, positive, then negatives), else the first pair of
    SENTENCE_COLUMN_CHOICES in `columns`, else anchor, positive and the negative columns."""
    if wanted:
        if len(wanted) < 2:
            raise PairDataError(f"sentence_columns must name at least two columns (then any negatives), "
                                f"got {list(wanted)}")
        if all(name in columns for name in wanted):
            return tuple(wanted)
        choices = [tuple(wanted)]
    else:
        for pair in SENTENCE_COLUMN_CHOICES:
            if all(name in columns for name in pair):
                return pair
        if all(name in columns for name in TUPLE_COLUMNS):
            return (*TUPLE_COLUMNS, *_negative_columns(source, columns))
        choices = [*SENTENCE_COLUMN_CHOICES, (*TUPLE_COLUMNS, "negative_1", "...")]
    expected = " or ".join(str(list(names)) for names in choices)
    raise PairDataError(f"{source}: sentence columns {expected} not found; the columns are {list(columns)}")


def _negative_columns(source: str, columns: dict) -> list[str]:
    """An n-tuple source's negatives: `negative`, or `negative_1` .. `negative_k` with none missing."""
    numbered = sorted(int(name.removeprefix("negative_")) for name in columns
                      if re.fullmatch(r"negative_[1-9][0-9]*", name))
    if "negative" in columns and numbered:
        raise PairDataError(f"{source}: both 'negative' and numbered negative columns; the columns are "
                            f"{list(columns)}")
    if numbered != list(range(1, len(numbered) + 1)):
        raise PairDataError(f"{source}: negative columns must be numbered negative_1 to negative_k with none missing; "
                            f"found {[f'negative_{n}' for n in numbered]}")
    return ["negative"] if "negative" in columns else [f"negative_{n}" for n in numbered]


def _pick_label_column(source: str, columns: dict, wanted: str | None, optional: bool = False) -> str | None:
    """The label column; None for an `optional` label that the source does not have."""
    choices = [wanted] if wanted else LABEL_COLUMN_CHOICES
    for name in choices:
        if name in columns:
            return name
    if optional and not wanted:
        return None
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


def _check_label_scale(source: str, scale: float) -> None:
    if not (scale > 0 and math.isfinite(scale)):
        raise PairDataError(f"{source}: label_scale must be a positive number, got {scale}")


def _scale_hint(top_label: float, scale: float, about_labels: bool) -> str:
    top = top_label * scale
    if not about_labels or top <= 1:
        return ""
    return f". Labels reach {top:g}: set label_scale to {math.ceil(top):g} if that is the top of the scale."


def _read_raw(source: Source) -> RawColumns:
    """All of the source's rows as one chunk."""
    return next(_raw_chunks(source, None))


def _raw_chunks(source: Source, chunk_rows: int | None) -> Iterator[RawColumns]:
    """The source's rows in chunks of `chunk_rows` (all in one when None); at least one chunk, which names the
    columns even when there are no rows."""
    if isinstance(source, HfSource):
        return _hf_chunks(source, chunk_rows)
    path = source.existing_path()
    if source.format in DELIMITERS:
        return _delimited_chunks(source, DELIMITERS[source.format], chunk_rows)
    if source.format == "jsonl":
        return _jsonl_chunks(source, chunk_rows)
    if source.format == "parquet":
        return _parquet_chunks(source, chunk_rows)
    raise PairDataError(f"{source.text}: unknown file type {path.suffix!r}; expected .csv, .tsv, .jsonl or .parquet")


def _numbered_rows(batches: Iterator[dict[str, list]], names: list[str]) -> Iterator[RawColumns]:
    """Column batches of a table as chunks whose rows are named by their place in the whole table."""
    start, empty = 0, True
    for batch in batches:
        yield RawColumns(batch, lambda i, start=start: f"row {start + i + 1}")
        start, empty = start + len(next(iter(batch.values()), [])), False
    if empty:
        yield RawColumns({name: [] for name in names}, str)


def _hf_chunks(source: HfSource, chunk_rows: int | None) -> Iterator[RawColumns]:
    table = source.table
    if source.streaming:  # rows arrive as the Hub sends them: no length, and column names only with the rows
        batches = table.iter(batch_size=chunk_rows or STREAMED_WHOLE)
        first = next(batches, {})
        return _numbered_rows(chain([first] if first else [], batches), list(first))
    return _numbered_rows(table.iter(batch_size=chunk_rows or max(len(table), 1)), list(table.column_names))
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


def _delimited_chunks(source: FileSource, delimiter: str, chunk_rows: int | None) -> Iterator[RawColumns]:
    lines: list[int] = []  # the line each row of this chunk ends on
    last_row_end = 0  # the line the last row read ended on (the header's at first)
    yielded = False
    try:
        with _open_text(source) as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise PairDataError(f"{source.text}: the file is empty; expected a header line")
            _check_header(source.text, header)
            last_row_end = reader.line_num
            columns: dict[str, list] = {name: [] for name in header}
            for row in reader:
                if len(row) != len(header):
                    raise PairDataError(
                        f"{source.text}, line {reader.line_num}: expected {len(header)} fields as in the header, got "
                        f"{len(row)}; check the delimiter and the quoting of that row"
                    )
                for values, cell in zip(columns.values(), row):
                    values.append(cell)
                last_row_end = reader.line_num
                lines.append(last_row_end)
                if len(lines) == chunk_rows:
                    yield RawColumns(columns, lambda i, lines=lines: f"line {lines[i]}")
                    lines, columns, yielded = [], {name: [] for name in header}, True
            if lines or not yielded:  # the last rows, or the header alone
                yield RawColumns(columns, lambda i, lines=lines: f"line {lines[i]}")
    except UnicodeDecodeError as err:
        raise _not_utf8(source) from err
    except csv.Error as err:
        if "unexpected end of data" not in str(err):
            raise PairDataError(f"{source.text}, line {reader.line_num}: malformed CSV ({err})") from err
        raise PairDataError(
            f"{source.text}, line {_unclosed_quote_line(source, delimiter, last_row_end + 1)}: a quoted field opens "
            "here and is never closed, so it runs to the end of the file; close the quote, or quote the whole field "
            'and double each quote inside it ("")'
        ) from err


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


def _jsonl_chunks(source: FileSource, chunk_rows: int | None) -> Iterator[RawColumns]:
    """Every key of any record is a column, so a first pass over the file finds them (and any broken line)."""
    names = list(dict.fromkeys(key for _, record in _jsonl_records(source) for key in record))
    chunk: list[tuple[int, dict]] = []
    yielded = False
    for numbered in _jsonl_records(source):
        chunk.append(numbered)
        if len(chunk) == chunk_rows:
            yield _jsonl_chunk(chunk, names)
            chunk, yielded = [], True
    if chunk or not yielded:
        yield _jsonl_chunk(chunk, names)


def _jsonl_chunk(records: list[tuple[int, dict]], names: list[str]) -> RawColumns:
    columns = {name: [record.get(name) for _, record in records] for name in names}
    return RawColumns(columns, lambda i: f"line {records[i][0]}")


def _jsonl_records(source: FileSource) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each line that is not blank."""
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
                yield number, record
    except UnicodeDecodeError as err:
        raise _not_utf8(source) from err


def _parquet_chunks(source: FileSource, chunk_rows: int | None) -> Iterator[RawColumns]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise PairDataError(f"{source.text}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files, when opening or reading
        table = pq.ParquetFile(source.path)
        if chunk_rows:
            batches = table.iter_batches(batch_size=chunk_rows)
        else:
            batches = [table.read()] if table.metadata.num_rows else []
        yield from _numbered_rows((batch.to_pydict() for batch in batches), table.schema_arrow.names)
    except Exception as err:
        raise PairDataError(f"{source.text}: unreadable Parquet file ({err})") from err
