"""`python -m minilm_sts mine-negatives` with the tiny model: the files it writes, its report, and one `error:` line
with exit status 2 for every mistake, before anything is written."""

import csv
import json
import math
import sys

import pytest

from minilm_sts.cli.commands import main
from minilm_sts.data.pairs import read_pairs

from helpers import cli, write_tsv

POOL = ["the man plays the guitar", "a man is playing guitar", "the woman plays the piano", "a cat eats food",
        "the dog is running on the road", "children play with a ball", "the car is on the street",
        "a woman is eating", "men and women run", "the cat and the dog", "a child plays piano", "dogs eat food"]


@pytest.fixture
def pairs_file(tmp_path):
    """Three duplicate clusters ({0, 1, 10}, {2, 3}, {4, 9}) and labelled-0 rows that bring the rest into the file."""
    rows = [[POOL[0], POOL[1], 1.0], [POOL[1], POOL[10], 1.0], [POOL[2], POOL[3], 1.0], [POOL[4], POOL[9], 1.0],
            [POOL[5], POOL[6], 0.0], [POOL[7], POOL[8], 0.2], [POOL[11], POOL[0], 0.0]]
    return write_tsv(tmp_path / "pairs.tsv", rows)


def mine(*args, model=None):
    main(["mine-negatives", *map(str, args), *(["--model", str(model)] if model else [])])


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_triplets_are_written_with_a_report(tiny_model_dir, pairs_file, tmp_path, capsys):
    mine(pairs_file, "--output", tmp_path / "mined.tsv", "--num-negatives", "2", model=tiny_model_dir)
    rows = read_rows(tmp_path / "mined.tsv")
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2"]
    assert [(row["anchor"], row["positive"]) for row in rows] == [(POOL[0], POOL[1]), (POOL[1], POOL[10]),
                                                                  (POOL[2], POOL[3]), (POOL[4], POOL[9])]
    clusters = [{0, 1, 10}, {0, 1, 10}, {2, 3}, {4, 9}]
    for row, cluster in zip(rows, clusters):
        assert {row["negative_1"], row["negative_2"]}.isdisjoint(POOL[i] for i in cluster)
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "anchors: 4 (4 positive pairs); corpus: 12 sentences; candidate ranks 0 to 2",
        "negatives: 8 (2 for each of 4 anchors)", "anchors dropped: 0 (none)",
        f"wrote 4 rows to {tmp_path / 'mined.tsv'}"]
    assert "Encoding" in out.err and "Searching" in out.err  # the progress bars


def test_the_default_model_is_the_base_all_minilm_l6_v2(real_model_dir, pairs_file, tmp_path):
    mine(pairs_file, "--output", tmp_path / "default.tsv", "--output-format", "pairs")  # as the README gives it
    mine(pairs_file, "--output", tmp_path / "named.tsv", "--output-format", "pairs", model=real_model_dir)
    assert (tmp_path / "default.tsv").read_text() == (tmp_path / "named.tsv").read_text()


def test_the_pairs_format_trains_with_cosent(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    mine(pairs_file, "--output", tmp_path / "mined.jsonl", "--output-format", "pairs", model=tiny_model_dir)
    table = read_pairs(str(tmp_path / "mined.jsonl"))
    assert table.labels == [1.0, 0.0, 0.0, 0.0] * 4 and table.sentences_a[:4] == [POOL[0]] * 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["minilm_sts"])
    main(["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(tmp_path / "mined.jsonl"),
          "--data.val_path", str(pairs_file), "--data.batch_size", "4", "--model.loss", "cosent",
          "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", "--data.forgetting_guard", "false"])
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    column = metrics[0].split(",").index("train/loss")
    losses = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert len(losses) == 2 and all(math.isfinite(value) for value in losses)


def test_the_triplets_train_with_mnrl_and_known_duplicates_masked(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """As the README gives it: the triplets file as it is written, read as n-tuples, trained by mnrl on its
    negatives with each sentence's duplicate cluster in the batch."""
    mine(pairs_file, "--output", tmp_path / "mined.tsv", "--num-negatives", "2", model=tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["minilm_sts"])
    main(["fit", "--model.pretrained", str(tiny_model_dir), "--data.train_path", str(tmp_path / "mined.tsv"),
          "--data.val_path", str(pairs_file), "--data.batch_size", "2", "--model.loss", "mnrl",
          "--model.loss_params", "{mask_known_duplicates: true}", "--trainer.max_steps", "2",
          "--trainer.log_every_n_steps", "1", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
          "--data.forgetting_guard", "false"])
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    column = metrics[0].split(",").index("train/loss")
    losses = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert len(losses) == 2 and all(math.isfinite(value) and value > 0 for value in losses)


def test_whole_number_id_columns_of_json_lines_join_clusters(tiny_model_dir, pairs_file, tmp_path):
    """POOL[5] shares POOL[0]'s question id 1 (as a JSON number), so no anchor of that cluster gets it."""
    header = ("sentence_0", "sentence_1", "label")
    ids = [(1, 2), (2, 11), (3, 4), (5, 10), (1, 7), (8, 9), (12, 1)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**dict(zip(header, row)), "qid1": a, "qid2": b}) + "\n"
                            for row, (a, b) in zip(read_rows(pairs_file), ids) for row in [row.values()]))
    negatives = {}
    for name, options in (("plain", []), ("ids", ["--id-columns", "qid1", "qid2"])):
        mine(path, "--output", tmp_path / f"{name}.tsv", "--num-negatives", "2", *options, model=tiny_model_dir)
        rows = read_rows(tmp_path / f"{name}.tsv")[:2]  # the anchors of cluster {0, 1, 10}, which POOL[5] joins
        negatives[name] = {row[f"negative_{i}"] for row in rows for i in (1, 2)}
    assert POOL[5] in negatives["plain"] and POOL[5] not in negatives["ids"]


def test_random_sampling_writes_the_same_file_twice(tiny_model_dir, pairs_file, tmp_path):
    for name, seed in (("first.tsv", ["--seed", "3"]), ("second.tsv", ["--seed", "3"]), ("42.tsv", ["--seed", "42"]),
                       ("default.tsv", [])):
        mine(pairs_file, "--output", tmp_path / name, "--sampling-strategy", "random", "--range-max", "8", *seed,
             model=tiny_model_dir)
    assert (tmp_path / "first.tsv").read_bytes() == (tmp_path / "second.tsv").read_bytes()
    assert (tmp_path / "42.tsv").read_bytes() == (tmp_path / "default.tsv").read_bytes()
    assert (tmp_path / "42.tsv").read_bytes() != (tmp_path / "first.tsv").read_bytes()


@pytest.mark.parametrize("kind", ["txt", "table"])
def test_a_corpus_file_gives_the_candidates(tiny_model_dir, pairs_file, tmp_path, kind):
    if kind == "txt":
        corpus, column = tmp_path / "corpus.txt", []
        corpus.write_text("\n".join(POOL[5:9] + [POOL[1]]) + "\n")
    else:
        corpus = write_tsv(tmp_path / "corpus.tsv", [[s, i] for i, s in enumerate(POOL[5:9] + [POOL[1]])],
                           header=("question", "id"))
        column = ["--corpus-column", "question"]
    mine(pairs_file, "--output", tmp_path / "mined.csv", "--corpus", corpus, *column, "--num-negatives", "5",
         model=tiny_model_dir)
    with open(tmp_path / "mined.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # The first two anchors' cluster holds POOL[1], which leaves them 4 candidates: dropped.
    assert [row["anchor"] for row in rows] == [POOL[2], POOL[4]]
    assert all({row[f"negative_{i}"] for i in range(1, 6)} == set(POOL[5:9] + [POOL[1]]) for row in rows)


def test_a_checkpoint_mines_as_its_exported_folder(trained_checkpoint, pairs_file, tmp_path):
    _, checkpoint, _ = trained_checkpoint
    mine(pairs_file, "--output", tmp_path / "from-ckpt.jsonl", model=checkpoint)
    main(["export", str(checkpoint), str(tmp_path / "exported")])
    mine(pairs_file, "--output", tmp_path / "from-folder.jsonl", model=tmp_path / "exported")
    first = [json.loads(line) for line in (tmp_path / "from-ckpt.jsonl").read_text().splitlines()]
    assert len(first) == 4 and (tmp_path / "from-ckpt.jsonl").read_text() == (
        tmp_path / "from-folder.jsonl").read_text()


def test_an_existing_output_is_kept_unless_overwrite(tiny_model_dir, pairs_file, tmp_path, capsys):
    output = tmp_path / "mined.tsv"
    output.write_text("kept\n")
    with pytest.raises(SystemExit) as exit:
        mine(pairs_file, "--output", output, model=tiny_model_dir)
    assert exit.value.code == 2 and output.read_text() == "kept\n"
    assert capsys.readouterr().err.strip() == f"error: {output} exists; choose another file, or replace it with " \
                                              "--overwrite"
    mine(pairs_file, "--output", output, "--overwrite", model=tiny_model_dir)
    assert len(read_rows(output)) == 4


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.tsv"], "missing.tsv: file not found"),
    (["{labels_0}"], "no positive pairs (label >= 1 after dividing by label_scale=1)"),
    (["{no_columns}"], "no sentence columns (sentence_0 and sentence_1, sentence1 and sentence2, or anchor and "
                       "positive)"),
    (["{pairs}", "--num-negatives", "0"], "num_negatives must be at least 1, got 0"),
    (["{pairs}", "--range-min", "2", "--range-max", "4"], "the rank range [2, 4) holds fewer than num_negatives=3"),
    (["{pairs}", "--relative-margin", "-0.05"], "relative_margin must be a number >= 0, got -0.05"),
    (["{pairs}", "--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["{pairs}", "--corpus", "{tmp}/missing.txt"], "missing.txt: file not found"),
    (["{pairs}", "--id-columns", "qid1", "qid2"], "id columns ['qid1', 'qid2'] not found"),
    (["{pairs}", "--output", "{tmp}/mined.txt"], "mined.txt: name the output .tsv, .csv, .jsonl or .parquet"),
    (["{pairs}", "--num-negatives", "20", "--range-max", "25"], "no anchor has 20 negatives, so nothing was written"),
])
def test_a_mistake_is_one_error_line_and_writes_nothing(tiny_model_dir, pairs_file, tmp_path, capsys, args, message):
    labels_0 = write_tsv(tmp_path / "labels_0.tsv", [[POOL[0], POOL[1], 0.5]])
    no_columns = write_tsv(tmp_path / "no_columns.tsv", [[POOL[0], POOL[1]]], header=("q1", "q2"))
    values = {"tmp": tmp_path, "pairs": pairs_file, "labels_0": labels_0, "no_columns": no_columns}
    args = [arg.format(**values) for arg in args]
    output = [] if "--output" in args else ["--output", str(tmp_path / "mined.tsv")]
    with pytest.raises(SystemExit) as exit:
        mine(*args, *output, model=tiny_model_dir)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit.value.code == 2 and len(errors) == 1 and message in errors[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels_0.tsv", "no_columns.tsv", "pairs.tsv"]


def test_the_command_line_exits_with_status_2_and_no_traceback(tmp_path):
    result = cli("mine-negatives", str(tmp_path / "missing.tsv"), "--output", str(tmp_path / "out.tsv"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
