"""Evaluation as its own unit, independent of training: correlations, binary classification and duplicate
retrieval, named and computed as sentence-transformers' evaluators do, so the numbers compare directly."""

from minilm_sts._deprecated import module_getattr

__getattr__ = module_getattr("evaluation")  # the names of the flat layout's evaluation.py, until 0.3
