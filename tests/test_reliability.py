"""Reliability: damaged or foreign checkpoints are refused clearly. (Preemption and kills are in
test_callbacks.py and test_resume.py, divergence in test_module_callbacks.py, fp16 skipped steps and
determinism in test_module.py, quirky input files in test_pairs.py.)"""

import lightning as L
import pytest
import torch

import minilm_sts
from minilm_sts.module import SentenceEmbedder


def test_damaged_or_foreign_checkpoints_are_refused_clearly(tiny_model_dir, tmp_path):
    model = SentenceEmbedder(pretrained=str(tiny_model_dir))
    trainer = L.Trainer(logger=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.ckpt: not a readable checkpoint"):
        minilm_sts.load(tmp_path / "truncated.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not written by minilm_sts"):
        minilm_sts.load(tmp_path / "foreign.ckpt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        minilm_sts.load(tmp_path / "missing.ckpt")
