"""The model card: filled from the run's own record, every metric of every evaluation set shown, and the same
card from a checkpoint written before the run record was a callback, and the loss it trained with."""

import json
import re
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.data.pairs import read_pairs
from minilm_sts.model.checkpoint import read_run_record
from minilm_sts.serving.export import export_with_card
from minilm_sts.serving.model_card import render_model_card
from minilm_sts.training.callbacks.run_record import RunRecord
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import attached, rewrite_in_the_previous_format, write_tsv


def test_model_card_states_the_run(trained_checkpoint, pair_files, tmp_path):
    model, path, record = trained_checkpoint
    card = (export_with_card(path, tmp_path / "out") / "README.md").read_text()
    log = record.record["log"]
    assert [row["step"] for row in log] == [2, 4]
    for row in log:  # every validation of the run, with its own numbers
        assert re.search(rf"\| \**{row['epoch']:.4f}\** \| \**{row['step']}\** \| \**{row['training_loss']:.4f}\** "
                         rf"\| \**{row['pearson_cosine']:.4f}\** \| \**{row['spearman_cosine']:.4f}\**", card)
    assert f"**spearman_cosine** | **{log[-1]['spearman_cosine']:.4f}**" in card  # the primary metric in bold
    assert "- Size: 40 pairs" in card and "- **Maximum Sequence Length:** 128 tokens" in card
    assert "- **Output Dimensionality:** 32 dimensions" in card and "Cosine Similarity" in card

    table = read_pairs(str(pair_files["train"]))
    lengths = [len(model.tokenizer(s)["input_ids"]) for s in table.sentences_a]
    assert (f"min: {min(lengths)} tokens<br>mean: {sum(lengths) / len(lengths):.2f} tokens<br>"
            f"max: {max(lengths)} tokens") in card
    assert f"min: {min(table.labels):.2f}<br>mean: {sum(table.labels) / 40:.2f}<br>max: {max(table.labels):.2f}" in card
    assert f"| {table.sentences_a[0]} | {table.sentences_b[0]} | {table.labels[0]:g} |" in card
    assert "`batch_size`: 8" in card.split("#### All Hyperparameters")[0]  # non-default
    assert "- PyTorch: " + torch.__version__ in card and "CosineSimilarityLoss" in card
    assert "| Metric | validation |\n" in card  # no test column: no test was run
    machine = record.record["machine"]
    assert "### Training Hardware\n\n- Precision: `32-true`\n- Machine: " in card  # what really ran, and where
    assert f"({machine['cpu_capability']}, " in card


def test_a_checkpoint_of_the_previous_format_gives_the_same_card(trained_checkpoint, tmp_path):
    _, path, _ = trained_checkpoint
    previous = shutil.copy(path, tmp_path / "previous.ckpt")
    rewrite_in_the_previous_format(previous)
    assert "RunRecord" not in torch.load(previous, weights_only=True)["callbacks"]
    card = (export_with_card(path, tmp_path / "now") / "README.md").read_text()
    assert (export_with_card(previous, tmp_path / "before") / "README.md").read_text() == card


def test_every_metric_of_every_set_and_the_monitored_one_in_bold(tiny_model_dir, pair_files, tmp_path):
    """A binary set monitored on average precision beside a graded set, then a test: the card lists each set's
    metrics (a dash where one does not apply), bolds cosine_ap and picks the best row by it."""
    graded = read_pairs(str(pair_files["val"]))
    duplicates = write_tsv(tmp_path / "duplicates.tsv", [[a, b, float(label >= 0.5)] for a, b, label in
                                                         zip(graded.sentences_a, graded.sentences_b, graded.labels)])
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), lr=1e-3)
    data = PairDataModule(str(pair_files["train"]), {"duplicates": str(duplicates), "graded": str(pair_files["val"])},
                          str(pair_files["val"]), batch_size=8, forgetting_guard=False)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/cosine_ap", mode="max", filename="best")
    trainer = L.Trainer(max_epochs=1, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        callbacks=[best], enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    trainer.test(model, data)
    run = attached(trainer, RunRecord).record
    card = render_model_card(model.hparams, run)

    assert "| Metric | validation: duplicates | validation: graded | test |" in card
    final = run["evaluation"]
    ap = final["val"]["duplicates"]["cosine_ap"]
    assert f"| **cosine_ap** | **{ap:.4f}** | **-** | **-** |" in card  # binary metrics only for the binary set
    spearman = [metrics["spearman_cosine"] for sets in (final["val"], final["test"]) for metrics in sets.values()]
    assert "| spearman_cosine | " + " | ".join(f"{value:.4f}" for value in spearman) + " |" in card
    assert "BinaryClassificationEvaluator" in card and "- cosine_f1_threshold\n" in card.split("---")[1]
    log = run["log"]
    best_row = max(log, key=lambda row: row["cosine_ap"])
    assert "| Training Loss | pearson_cosine | spearman_cosine | cosine_ap |" in card
    assert f"| **{best_row['step']}** |" in card
    assert read_run_record(torch.load(best.best_model_path, weights_only=True))["monitor"] == {
        "key": "val/cosine_ap", "mode": "max"}


@pytest.mark.parametrize("loss, params, class_name, stated", [
    ("cosine_mse", None, "CosineSimilarityLoss",
     {"loss_fct": "torch.nn.modules.loss.MSELoss", "cos_score_transformation": "torch.nn.modules.linear.Identity"}),
    ("cosent", {"scale": 10.0}, "CoSENTLoss", {"scale": 10.0, "similarity_fct": "pairwise_cos_sim"}),
    ("angle", None, "AnglELoss", {"scale": 20.0, "similarity_fct": "pairwise_angle_sim"}),
    ("mnrl", None, "MultipleNegativesRankingLoss", {"scale": 20.0, "similarity_fct": "cos_sim"}),
    ("mnrl", {"symmetric": True, "scale": 5}, "MultipleNegativesSymmetricRankingLoss",
     {"scale": 5, "similarity_fct": "cos_sim"}),
    ("mnrl", {"mini_batch_size": 4, "mask_known_duplicates": True}, "CachedMultipleNegativesRankingLoss",
     {"scale": 20.0, "mini_batch_size": 4, "mask_known_duplicates": True, "similarity_fct": "cos_sim"}),
])
def test_the_card_names_the_loss_its_parameters_and_the_rows_left_out(tiny_model_dir, pair_files, tmp_path, loss,
                                                                       params, class_name, stated):
    graded = read_pairs(str(pair_files["train"]))
    binary = write_tsv(tmp_path / "binary.tsv", [[a, b, float(label >= 0.5)] for a, b, label in
                                                 zip(graded.sentences_a, graded.sentences_b, graded.labels)])
    zeros = sum(label < 0.5 for label in graded.labels)
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss=loss, loss_params=params)
    data = PairDataModule(str(binary), str(pair_files["val"]), None, batch_size=8)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, data)
    card = render_model_card(model.hparams, attached(trainer, RunRecord).record)

    assert f"- loss:{class_name}\n" in card
    assert f"- Loss: `{class_name}` (minilm_sts `{loss}`) with these parameters:\n\n```json\n" \
           f"{json.dumps(stated, indent=4)}\n```" in card
    if loss == "mnrl":
        assert 0 < zeros < 40
        assert f"- Size: {40 - zeros} pairs ({zeros} rows labelled 0 left out: mnrl uses positive pairs only)\n" in card
    else:
        assert "- Size: 40 pairs\n" in card and "left out" not in card
    assert f"`loss`: {loss}" in card


def test_the_card_of_a_triplet_set_names_its_negative_columns(tiny_model_dir, pair_files, tmp_path):
    graded = read_pairs(str(pair_files["train"]))
    triplets = [[a, b, graded.sentences_b[(i + 1) % len(graded)]]
                for i, (a, b) in enumerate(zip(graded.sentences_a, graded.sentences_b))]
    train = write_tsv(tmp_path / "triplets.tsv", triplets, header=("anchor", "positive", "negative"))
    L.seed_everything(0)
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir), loss="mnrl")
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, PairDataModule(str(train), str(pair_files["val"]), None, batch_size=8))
    card = render_model_card(model.hparams, attached(trainer, RunRecord).record)
    assert f"- Size: {len(triplets)} rows (n-tuple with 1 negative(s): anchor, positive and negative)" in card
    assert "- Columns: `anchor`, `positive`, `negative` and `label`\n" in card
