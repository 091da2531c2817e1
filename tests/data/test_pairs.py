"""Reading pair sources: formats, column recognition, label scaling, and a clear error for each bad input."""

import gzip
import json

import pytest

from minilm_sts.data.pairs import read_pairs, read_sentences
from minilm_sts.data.sources import FileSource, HfSource, builtin_path, parse_source
from minilm_sts.errors import PairDataError

from helpers import FIXTURES, write_tsv

GOOD = [["a man plays", "a man is playing", 0.9], ["a dog", "a cat", 0.2]]


def test_reads_tsv_csv_jsonl_parquet_and_gz(tmp_path):
    write_tsv(tmp_path / "p.tsv", GOOD)
    (tmp_path / "p.csv").write_text('sentence_0,sentence_1,label\n"a man plays","a man is playing",0.9\n'
                                    'a dog,a cat,0.2\n')
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(dict(zip(["sentence_0", "sentence_1", "label"], r)))
                                                for r in GOOD))
    with gzip.open(tmp_path / "p.tsv.gz", "wt") as handle:
        handle.write((tmp_path / "p.tsv").read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence_0": [r[0] for r in GOOD], "sentence_1": [r[1] for r in GOOD],
                             "label": [r[2] for r in GOOD]}), tmp_path / "p.parquet")
    for name in ("p.tsv", "p.csv", "p.jsonl", "p.tsv.gz", "p.parquet"):
        table = read_pairs(str(tmp_path / name))
        assert table.sentences_a == ["a man plays", "a dog"] and table.labels == [0.9, 0.2], name


def test_quoted_fields_are_read_correctly():
    """Quora rows with doubled quotes inside quoted fields (csv.QUOTE_MINIMAL): every line is one row, unquoted."""
    path = FIXTURES / "quora_quoting.tsv"
    table = read_pairs(str(path))
    assert len(table) == len(path.read_text(encoding="utf-8").splitlines()) - 1  # the header
    assert table.sentences_a[2] == 'In the play "A Raisin in the Sun", why do Walter ad Beneatha argue?'
    assert table.sentences_b[5] == 'What do you think when you hear the word, "Japan"?'
    assert table.sentences_b[7] == "What is your favorite top 10 list of \u201cSun\u201d songs?"
    assert table.labels == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_recognises_stsb_columns_and_scales_labels():
    table = read_pairs(str(FIXTURES / "stsb" / "dev.tsv"), label_scale=5.0)  # sentence1, sentence2, score
    assert len(table) == 6 and max(table.labels) == 1.0 and min(table.labels) == 0.0
    assert table.labels[3] == pytest.approx(4.2 / 5)  # written "4.2", not "4.200"


def test_packaged_stsb_equals_original_divided_by_five():
    """tests/fixtures/stsb/ holds rows of the original STS-B files in their order: the first and last row, a 0
    and a 5 score, and fields with doubled quotes. The packaged copy has the README's row counts and holds
    those rows, in the same order, with labels divided by five."""
    for split, size in (("train", 5749), ("dev", 1500), ("test", 1379)):
        packaged = read_pairs(f"builtin:stsb/{split}")
        original = read_pairs(str(FIXTURES / "stsb" / f"{split}.tsv"), label_scale=5.0)
        rows = list(zip(packaged.sentences_a, packaged.sentences_b, packaged.labels))
        sample = list(zip(original.sentences_a, original.sentences_b, original.labels))
        assert len(rows) == size and rows[0] == sample[0] and rows[-1] == sample[-1], split
        remaining = iter(rows)
        assert all(row in remaining for row in sample), split  # an ordered subsequence


def test_explicit_columns(tmp_path):
    path = write_tsv(tmp_path / "p.tsv", [["x", "q", "a man", 3]], header=("left", "query", "doc", "sim"))
    table = read_pairs(str(path), sentence_columns=["query", "doc"], label_column="sim", label_scale=4)
    assert table.sentences_a == ["q"] and table.labels == [0.75]


@pytest.mark.parametrize(
    "rows, header, kwargs, message",
    [
        ([["a", "b", "0.5"]], ("text_a", "sentence_1", "label"), {}, r"sentence columns .* not found; the columns are"),
        ([["a", "b", "0.5"]], ("sentence_0", "sentence_1", "y"), {}, r"label column label or score not found"),
        ([["a", "b", "0.5"], ["a", "  ", "0.5"]], None, {},
         r"line 3, column 'sentence_1': expected a non-empty sentence"),
        ([["a", "b", "0.5"], ["", "b", "0.5"]], None, {}, r"line 3, column 'sentence_0'"),
        ([["a", "b", "high"]], None, {}, r"line 2, column 'label': expected a finite number, got 'high'"),
        ([["a", "b", "0.1"], ["a", "b", "nan"]], None, {}, r"line 3, column 'label': expected a finite number"),
        ([["a", "b", "inf"]], None, {}, r"line 2, column 'label': expected a finite number"),
        ([["a", "b", "-0.1"]], None, {}, r"line 2, column 'label': expected a label in \[0, 1\]"),
        ([["a", "b", "4.2"]], None, {}, r"label in \[0, 1\] .* set label_scale to 5"),
        ([["a", "b", "0.5"]], None, {"label_scale": 0}, r"label_scale must be a positive number"),
        ([["a", "b", "0.5", "extra"]], None, {}, r"line 2: expected 3 fields as in the header, got 4"),
        ([], None, {}, r"no data rows"),
        ([["a", "b", "0.5"]], ("sentence_0", "sentence_0", "label"), {}, r"duplicate column name"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path, rows, header, kwargs, message):
    path = write_tsv(tmp_path / "bad.tsv", rows, header=header or ("sentence_0", "sentence_1", "label"))
    with pytest.raises(PairDataError, match=message) as err:
        read_pairs(str(path), **kwargs)
    assert str(path) in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(PairDataError, match="file not found"):
        read_pairs(str(tmp_path / "missing.tsv"))
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(PairDataError, match="empty"):
        read_pairs(str(tmp_path / "empty.tsv"))
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(PairDataError, match="unknown file type '.xlsx'"):
        read_pairs(str(tmp_path / "p.xlsx"))
    (tmp_path / "latin.tsv").write_bytes("sentence_0\tsentence_1\tlabel\ncaf\xe9\tb\t0.5\n".encode("latin-1"))
    with pytest.raises(PairDataError, match="not valid UTF-8"):
        read_pairs(str(tmp_path / "latin.tsv"))
    (tmp_path / "broken.jsonl").write_text('{"sentence_0": "a", "sentence_1": "b", "label": 1}\n{"sentence_0": "a",\n')
    with pytest.raises(PairDataError, match="line 2: broken JSON"):
        read_pairs(str(tmp_path / "broken.jsonl"))
    with pytest.raises(PairDataError, match="no packaged dataset"):
        read_pairs("builtin:stsb/validation")
    with pytest.raises(PairDataError, match=r"expected hf:NAME\[:CONFIG\]:SPLIT"):
        read_pairs("hf:only-a-name")


def test_drop_invalid_is_opt_in_counted_and_reported(tmp_path):
    rows = [["a dog", "a cat", "0.5"], ["", "a cat", "0.5"], ["a man", "a woman", "nan"], ["b", "c", "7"],
            ["d", "e", "1"]]
    path = write_tsv(tmp_path / "mixed.tsv", rows)
    with pytest.raises(PairDataError, match="line 3"):
        read_pairs(str(path))
    with pytest.warns(UserWarning, match=r"dropped 3 invalid row\(s\) of 5 \(drop_invalid\); the first: .*line 3"):
        table = read_pairs(str(path), drop_invalid=True)
    assert table.sentences_a == ["a dog", "d"] and table.labels == [0.5, 1.0] and table.dropped == 3


def test_hugging_face_dataset_while_offline(monkeypatch):
    import sys
    import types

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/pairs' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(PairDataError,
                       match=r"hf:org/pairs:train: could not load the Hugging Face dataset \(ConnectionError"):
        read_pairs("hf:org/pairs:train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed at all
    with pytest.raises(PairDataError, match="need the `datasets` package"):
        read_pairs("hf:org/pairs:train")


def test_sources_parse_into_one_kind_of_object_each():
    local = parse_source("~/data/quora/dev.tsv.gz")
    assert isinstance(local, FileSource) and local.name == "dev" and local.format == "tsv" and local.compressed
    assert not str(local.path).startswith("~")
    packaged = parse_source("builtin:stsb/dev")
    assert packaged == FileSource("builtin:stsb/dev", builtin_path("stsb/dev"), "stsb-dev") and packaged.format == "tsv"
    assert parse_source("hf:org/pairs:train") == HfSource("hf:org/pairs:train", "org/pairs", None, "train")
    hub = parse_source("hf:org/pairs:en:validation")
    assert (hub.dataset, hub.config, hub.split, hub.name) == ("org/pairs", "en", "validation",
                                                              "org-pairs-en-validation")
    assert parse_source(hub) is hub
    for bad in ("hf:a:b:c:d", "hf::train"):
        with pytest.raises(PairDataError, match=r"expected hf:NAME\[:CONFIG\]:SPLIT"):
            parse_source(bad)


def test_missing_file_or_directory_names_the_accepted_types(tmp_path):
    accepted = (r"expected a \.csv, \.tsv, \.jsonl or \.parquet file .*builtin:stsb/SPLIT, hf:NAME\[:CONFIG\]:SPLIT or "
                r"hf\+stream:NAME\[:CONFIG\]:SPLIT")
    with pytest.raises(PairDataError, match=f"missing.tsv: file not found; {accepted}"):
        read_pairs(str(tmp_path / "missing.tsv"))
    with pytest.raises(PairDataError, match=f"{tmp_path} is a directory, not a file; {accepted}"):
        read_pairs(str(tmp_path))
    with pytest.raises(PairDataError, match="missing.txt: file not found"):
        read_sentences(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    "name, text, line",
    [
        ("one.tsv", 'sentence_0\tsentence_1\tlabel\na\tb\t0.5\n"a dog\ta cat\t0.5\nb\tc\t1\n', 3),
        # the row starts on line 2 with a multi-line field that is closed; the unclosed one opens on line 3
        ("two.tsv", 'sentence_0\tsentence_1\tlabel\n"two\nlines"\t"x\ny\t0.5\nb\tc\t1\n', 3),
        ("header.csv", '"sentence_0,sentence_1,label\na,b,0.5\n', 1),
        ("crlf.csv", 'sentence_0,sentence_1,label\r\na,b,0.5\r\nc,"d\r\ne\r\n', 3),
    ],
)
def test_unclosed_quote_names_the_line_where_it_opens(tmp_path, name, text, line):
    (tmp_path / name).write_bytes(text.encode())
    with pytest.raises(PairDataError, match=f"{name}, line {line}: a quoted field opens here and is never closed"):
        read_pairs(str(tmp_path / name))


def test_other_malformed_quoting_names_the_line(tmp_path):
    (tmp_path / "stray.csv").write_text('sentence_0,sentence_1,label\na,b,0.5\n"c"d,e,0.5\n')
    with pytest.raises(PairDataError, match=r"stray.csv, line 3: malformed CSV"):
        read_pairs(str(tmp_path / "stray.csv"))


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    # Far enough down that the decoder's read-ahead block no longer starts at the offending line.
    rows = "".join(f"row {i}\tb\t0.5\n" for i in range(3000)).encode()
    data = b"sentence_0\tsentence_1\tlabel\n" + rows.replace(b"row 2500\t", b"row 25\xe900\t")
    (tmp_path / "latin.tsv").write_bytes(data)
    with gzip.open(tmp_path / "latin.tsv.gz", "wb") as handle:
        handle.write(data)
    (tmp_path / "latin.jsonl").write_bytes(b'{"sentence_0": "a", "sentence_1": "b", "label": 1}\n'
                                           b'{"sentence_0": "\xff"}\n')
    (tmp_path / "latin.txt").write_bytes(b"a dog\nb\xe9\n")
    expected = {"latin.tsv": (2502, "0xe9", 7), "latin.tsv.gz": (2502, "0xe9", 7), "latin.jsonl": (2, "0xff", 17),
                "latin.txt": (2, "0xe9", 2)}
    for name, (line, byte, position) in expected.items():
        read = read_sentences if name.endswith(".txt") else read_pairs
        with pytest.raises(PairDataError, match=rf"{name}, line {line}: not valid UTF-8 \(byte {byte} "
                                                rf"at byte {position} "
                                                r"of the line.*\); re-save the file as UTF-8"):
            read(str(tmp_path / name))


def test_text_file_quirks(tmp_path):
    (tmp_path / "bom_crlf.tsv").write_bytes("\ufeffsentence_0\tsentence_1\tlabel\r\n"
                                            "a dog\ta cat\t0.5\r\nb\tc\t1\r\n".encode())
    table = read_pairs(str(tmp_path / "bom_crlf.tsv"))  # a BOM and CRLF line endings read cleanly
    assert table.sentences_a == ["a dog", "b"] and table.labels == [0.5, 1.0]
    (tmp_path / "quote.tsv").write_text('sentence_0\tsentence_1\tlabel\n"a dog\ta cat\t0.5\nb\tc\t1\n')
    with pytest.raises(PairDataError, match="quote.tsv"):  # an unclosed quote swallows the rest of the file
        read_pairs(str(tmp_path / "quote.tsv"))


def test_parquet_with_wrong_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence_0": [1, 2], "sentence_1": ["a", "b"], "label": [0.5, 0.1]}),
                   tmp_path / "p.parquet")
    with pytest.raises(PairDataError, match=r"row 1, column 'sentence_0': expected a non-empty sentence, got 1"):
        read_pairs(str(tmp_path / "p.parquet"))
    pq.write_table(pa.table({"sentence_0": ["a"], "sentence_1": ["b"], "label": [None]}), tmp_path / "n.parquet")
    with pytest.raises(PairDataError, match="row 1, column 'label': expected a finite number, got None"):
        read_pairs(str(tmp_path / "n.parquet"))
