"""Reading pair sources: formats, column recognition, label scaling, and a clear error for each bad input."""

import gzip
import json

import pytest

from minilm_sts.pairs import PairDataError, read_pairs

from conftest import FIXTURES, write_tsv

GOOD = [["a man plays", "a man is playing", 0.9], ["a dog", "a cat", 0.2]]


def test_reads_tsv_csv_jsonl_parquet_and_gz(tmp_path):
    write_tsv(tmp_path / "p.tsv", GOOD)
    (tmp_path / "p.csv").write_text('sentence_0,sentence_1,label\n"a man plays","a man is playing",0.9\na dog,a cat,0.2\n')
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(dict(zip(["sentence_0", "sentence_1", "label"], r))) for r in GOOD))
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
        ([["a", "b", "0.5"], ["a", "  ", "0.5"]], None, {}, r"line 3, column 'sentence_1': expected a non-empty sentence"),
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
    rows = [["a dog", "a cat", "0.5"], ["", "a cat", "0.5"], ["a man", "a woman", "nan"], ["b", "c", "7"], ["d", "e", "1"]]
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
    with pytest.raises(PairDataError, match=r"hf:org/pairs:train: could not load the Hugging Face dataset \(ConnectionError"):
        read_pairs("hf:org/pairs:train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed at all
    with pytest.raises(PairDataError, match="need the `datasets` package"):
        read_pairs("hf:org/pairs:train")
