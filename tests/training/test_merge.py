"""Merging with the base (MergeWithBase): θ(0) is the base and θ(1) the fine-tuned weights exactly, the α chosen is
the best on the dev metric among those that keep the forgetting guard, and a fit ends holding that model, with
the curve in its run record and a merged checkpoint beside an untouched last.ckpt."""

import csv
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

import minilm_sts.training.callbacks.merge as merge_module
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.data.pairs import read_pairs
from minilm_sts.errors import UserInputError
from minilm_sts.model.checkpoint import ENCODER_PREFIX, read_run_record
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.merge_picture import save_merge_picture
from minilm_sts.serving.model_card import render_model_card
from minilm_sts.training.callbacks.merge import (
    MergeWithBase,
    base_weights,
    checked_alphas,
    choose_alpha,
    interpolate,
    log_curve,
)
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import attached, cli, write_tsv


def test_alpha_0_is_the_base_and_alpha_1_the_fine_tuned_weights_exactly():
    torch.manual_seed(0)
    base = {"w": torch.randn(50, 7), "b": torch.randn(7), "ids": torch.arange(5)}
    tuned = {"w": torch.randn(50, 7), "b": torch.randn(7), "ids": torch.arange(5) + 1}
    assert all(torch.equal(interpolate(base, tuned, 0.0)[k], base[k]) for k in ("w", "b"))
    assert all(torch.equal(interpolate(base, tuned, 1.0)[k], tuned[k]) for k in tuned)
    halfway = interpolate(base, tuned, 0.25)
    assert torch.allclose(halfway["w"], 0.75 * base["w"] + 0.25 * tuned["w"])
    assert torch.equal(halfway["ids"], tuned["ids"])  # integers are not interpolated
    with pytest.raises(ValueError, match=r"differ in names: \['extra'\]"):
        interpolate(base, {**tuned, "extra": torch.zeros(1)}, 0.5)


def curve(*rows):
    return [{"alpha": alpha, "dev": dev, "guard": guard} for alpha, dev, guard in rows]


def test_the_best_dev_alpha_that_keeps_the_guard_is_chosen():
    # α = 1 is best on the dev metric but loses the guard: the best α that keeps it wins
    rows = curve((0.0, 0.80, 0.85), (0.25, 0.81, 0.86), (0.5, 0.83, 0.851), (0.75, 0.84, 0.849), (1.0, 0.85, 0.84))
    assert choose_alpha(rows, "max") == 0.5
    assert choose_alpha(rows[::-1], "max") == 0.5  # the order of the rows does not matter
    # under mode min the lowest value wins, under the same guard rule
    assert choose_alpha(curve((0.0, 0.5, 0.85), (0.5, 0.4, 0.85), (1.0, 0.3, 0.84)), "min") == 0.5
    # a guard exactly at the base's value is kept; ties in the dev metric go to the smaller α
    assert choose_alpha(curve((0.0, 0.80, 0.85), (0.5, 0.83, 0.85), (1.0, 0.83, 0.85)), "max") == 0.5
    # no merge keeps the guard: the base
    assert choose_alpha(curve((0.0, 0.80, 0.85), (0.5, 0.90, 0.8499), (1.0, 0.95, 0.70)), "max") == 0.0
    # without a guard the dev metric alone decides
    assert choose_alpha(curve((0.0, 0.80, None), (0.5, 0.83, None), (1.0, 0.85, None)), "max") == 1.0


def test_alphas_are_checked_and_the_base_is_always_scored():
    assert checked_alphas([1, 0.5]) == [0.0, 0.5, 1.0]
    assert checked_alphas([0, 0.25, 0.5, 0.75, 1.0]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(UserInputError, match=r"between 0 \(the base\) and 1 .* got \[0.5, 1.5\]"):
        MergeWithBase(alphas=[0.5, 1.5])
    with pytest.raises(UserInputError, match="at least one α above 0"):
        MergeWithBase(alphas=[0.0])


def fit(tiny_model_dir, pair_files, tmp_path, merge, monitor="val/spearman_cosine"):
    """Two steps with the forgetting guard on (STS-B dev, validated before training and at the end) and
    checkpoints in tmp_path."""
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), lr=1e-3)
    data = PairDataModule(str(pair_files["train"]), str(pair_files["val"]), None, batch_size=20)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor=monitor, mode="max", save_last=True)
    trainer = L.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        callbacks=[merge, checkpoint], enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    return model, trainer


@pytest.mark.slow
def test_a_fit_ends_with_the_chosen_merge_and_keeps_the_fine_tuned_weights(tiny_model_dir, pair_files, tmp_path):
    merge = MergeWithBase(alphas=[0.5, 1.0])
    model, trainer = fit(tiny_model_dir, pair_files, tmp_path, merge)
    record = attached(trainer, RunRecord).record
    rows = record["merge"]["curve"]
    assert [row["alpha"] for row in rows] == [0.0, 0.5, 1.0]
    # α = 0 is the base as validated before training, α = 1 the fine-tuned model at its last validation
    assert rows[0]["guard"] == pytest.approx(record["before_training"]["stsb"]["spearman_cosine"], abs=1e-6)
    assert rows[0]["dev"] == pytest.approx(record["before_training"]["val"]["spearman_cosine"], abs=1e-6)
    assert rows[-1]["dev"] == pytest.approx(record["log"][-1]["spearman_cosine"], abs=1e-6)
    chosen = record["merge"]["chosen"]
    assert chosen == choose_alpha(rows, "max")
    assert next(row for row in rows if row["alpha"] == chosen)["guard"] >= rows[0]["guard"]
    assert (record["merge"]["monitor"], record["merge"]["guard"]) == ("val/spearman_cosine", "val/stsb/spearman_cosine")

    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "merge" not in read_run_record(last)  # last.ckpt: the fine-tuned weights and their record
    expected = interpolate(base_weights(model), last["state_dict"], chosen)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())
    merged = torch.load(merge.checkpoint_path, weights_only=True)
    assert merge.checkpoint_path == str(tmp_path / f"merged-alpha{chosen:g}.ckpt")
    assert all(torch.equal(merged["state_dict"][key], value) for key, value in expected.items())
    assert "optimizer_states" not in merged and read_run_record(merged)["merge"] == record["merge"]
    assert read_run_record(merged)["evaluation"]["val"]["val"]["spearman_cosine"] == pytest.approx(
        next(row for row in rows if row["alpha"] == chosen)["dev"])


@pytest.mark.slow
def test_when_no_merge_keeps_the_guard_the_run_keeps_the_base(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    """Scores made up so that the dev metric rises with α while the guard falls below the base's."""
    made_up = iter([{"val": {"spearman_cosine": dev}, "stsb": {"spearman_cosine": guard}}
                    for dev, guard in ((0.5, 0.8), (0.6, 0.79), (0.7, 0.6))])
    monkeypatch.setattr(merge_module, "score_validation", lambda trainer, module: next(made_up))
    merge = MergeWithBase(alphas=[0.5, 1.0])
    with pytest.warns(UserWarning, match=r"keeps the base model \(α = 0\)"):
        model, trainer = fit(tiny_model_dir, pair_files, tmp_path, merge)
    assert attached(trainer, RunRecord).record["merge"]["chosen"] == 0.0
    assert all(torch.equal(model.state_dict()[key], value) for key, value in base_weights(model).items())
    assert merge.checkpoint_path.endswith("merged-alpha0.ckpt")


@pytest.mark.slow
def test_a_disabled_merge_changes_nothing(tiny_model_dir, pair_files, tmp_path):
    merge = MergeWithBase(enabled=False)
    _, trainer = fit(tiny_model_dir, pair_files, tmp_path, merge)
    assert "merge" not in attached(trainer, RunRecord).record and merge.checkpoint_path == ""
    assert not list(tmp_path.glob("merged*"))


def test_a_monitor_of_no_validation_set_stops_the_run_before_training(tiny_model_dir, pair_files, tmp_path):
    with pytest.raises(UserInputError, match="val/quora/cosine_ap is not a metric of a validation set"):
        fit(tiny_model_dir, pair_files, tmp_path, MergeWithBase(), monitor="val/quora/cosine_ap")
    assert not list(tmp_path.glob("*.ckpt"))


def card_of(merge: dict) -> str:
    hparams = {"pretrained": "base-model", "max_seq_length": 128, "encoder_config": {"hidden_size": 32}}
    return render_model_card(hparams, {"merge": {"monitor": "val/cosine_mrr@10", "base": "base-model", **merge}})


def test_the_card_gives_the_curve_the_rule_and_the_outcome():
    guarded = card_of({"guard": "val/stsb/spearman_cosine", "chosen": 0.5,
                       "curve": curve((0.0, 0.80, 0.85), (0.5, 0.83, 0.851), (1.0, 0.85, 0.84))})
    assert ("| α | val/cosine_mrr@10 | val/stsb/spearman_cosine (guard) | guard kept |  |\n"
            "| --- | --- | --- | --- | --- |\n"
            "| 0 | 0.8000 | 0.8500 | yes |  |\n"
            "| **0.5** | **0.8300** | **0.8510** | **yes** | **chosen** |\n"
            "| 1 | 0.8500 | 0.8400 | no |  |\n") in guarded
    assert "at α = **0.5**" in guarded and "whose forgetting guard (`val/stsb/spearman_cosine`) is at least" in guarded
    assert "this is the base model" not in guarded
    base = card_of({"guard": "val/stsb/spearman_cosine", "chosen": 0.0,
                    "curve": curve((0.0, 0.80, 0.85), (1.0, 0.85, 0.84))})
    assert "No merge with the fine-tuned weights kept the guard: this is the base model." in base
    unguarded = card_of({"guard": None, "chosen": 1.0, "curve": curve((0.0, 0.80, None), (1.0, 0.85, None))})
    assert "| α | val/cosine_mrr@10 |  |\n| --- | --- | --- |\n| 0 | 0.8000 |  |\n" in unguarded
    assert "no STS-B dev set" in unguarded


def test_wandb_gets_the_curve_as_a_table_and_a_chart(tmp_path, monkeypatch):
    logger = WandbLogger(project="merge", save_dir=str(tmp_path))  # disabled (conftest): what it is given is kept
    logged = {}
    monkeypatch.setattr(logger, "log_metrics", lambda metrics, step=None: logged.update(metrics))
    monkeypatch.setattr(logger.experiment, "log", lambda values: logged.update(values))
    merge = {"monitor": "val/cosine_mrr@10", "guard": "val/stsb/spearman_cosine", "chosen": 0.5,
             "curve": curve((0.0, 0.80, 0.85), (0.5, 0.83, 0.851), (1.0, 0.85, 0.84))}
    log_curve(SimpleNamespace(loggers=[logger], global_step=7), merge)
    assert (logged["merge/alpha"], logged["merge/val/cosine_mrr@10"], logged["merge/val/stsb/spearman_cosine"]) == (
        0.5, 0.83, 0.851)
    assert logged["merge/curve"].columns == ["alpha", "val/cosine_mrr@10", "val/stsb/spearman_cosine"]
    assert logged["merge/curve"].data == [[0.0, 0.80, 0.85], [0.5, 0.83, 0.851], [1.0, 0.85, 0.84]]
    assert "merge/curve_chart" in logged


def test_the_picture_draws_one_panel_per_curve(tmp_path):
    from PIL import Image

    merge = {"monitor": "val/cosine_mrr@10", "chosen": 0.5,
             "curve": curve((0.0, 0.80, 0.85), (0.5, 0.83, 0.851), (1.0, 0.85, 0.84))}
    guarded = Image.open(save_merge_picture({**merge, "guard": "val/stsb/spearman_cosine"}, tmp_path / "a.png"))
    alone = Image.open(save_merge_picture({**merge, "guard": None}, tmp_path / "b.png"))
    assert guarded.width == alone.width and guarded.height > alone.height
    colours = {colour for _, colour in guarded.getcolors(maxcolors=1 << 16)}
    assert {(31, 119, 180), (214, 39, 40)} <= colours  # both curves drawn


@pytest.mark.slow
def test_the_mined_duplicates_recipe_exports_the_merge_it_chose_with_the_curve_in_its_card(tiny_model_dir,
                                                                                            pair_files, tmp_path):
    graded = read_pairs(str(pair_files["train"]))
    binary = [[a, b, float(label >= 0.5)] for a, b, label in zip(graded.sentences_a, graded.sentences_b, graded.labels)]
    # Triplets as mine-negatives writes them; each anchor's negative is the next row's second sentence.
    triplets = [[a, b, binary[(i + 1) % len(binary)][1]] for i, (a, b, label) in enumerate(binary) if label == 1.0]
    train = write_tsv(tmp_path / "train.tsv", triplets, header=("anchor", "positive", "negative"))
    dev = write_tsv(tmp_path / "dev.tsv", binary[:16])
    result = cli("fit", "--config", "duplicates_mined", "--model.pretrained", str(tiny_model_dir),
                 "--data.train_path", f"{{duplicates: {train}, stsb: builtin:stsb/train}}",
                 "--data.val_path", f"{{duplicates: {dev}, stsb: builtin:stsb/dev}}", "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2", "--trainer.precision", "32", "--export.dirpath", "model",
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
                 cwd=tmp_path)
    merged = next(tmp_path.rglob("merged-alpha*.ckpt"))
    merge = read_run_record(torch.load(merged, weights_only=True))["merge"]
    assert merged.name == f"merged-alpha{merge['chosen']:g}.ckpt"
    assert (merge["monitor"], merge["guard"]) == ("val/cosine_mrr@10", "val/stsb/spearman_cosine")
    assert [row["alpha"] for row in merge["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f"Merged with the base: {merged.relative_to(tmp_path)}" in result.stdout
    assert f"export {merged.relative_to(tmp_path)} " in result.stdout  # the next commands name the merged model

    card = (tmp_path / "model" / "README.md").read_text()
    assert "### Merging with the base" in card
    assert "![val/cosine_mrr@10 and the guard against α](merge_curve.png)" in card
    assert (tmp_path / "model" / "merge_curve.png").stat().st_size > 0
    for row in merge["curve"]:
        cells = [f"{row['alpha']:g}", f"{row['dev']:.4f}", f"{row['guard']:.4f}"]
        assert re.search(r"\| " + r" \| ".join(rf"(\*\*)?{re.escape(c)}(\*\*)?" for c in cells), card), cells
    assert re.search(rf"\| \*\*{merge['chosen']:g}\*\* \|.*\| \*\*chosen\*\* \|", card)

    last = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["state_dict"]
    base = {ENCODER_PREFIX + k: v for k, v in SentenceEncoder.from_pretrained(tiny_model_dir).state_dict().items()}
    expected = interpolate(base, last, merge["chosen"])
    exported = SentenceEncoder.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(exported[key.removeprefix(ENCODER_PREFIX)], value) for key, value in expected.items())

    with open(next(tmp_path.rglob("metrics.csv")), newline="") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("merge/alpha")]
    assert [float(row["merge/alpha"]) for row in logged] == [merge["chosen"]]
