"""Fine-tune sentence embedders (all-MiniLM-L6-v2 and other BERTs) with cosine-MSE on labelled pairs."""

from minilm_sts.datamodule import PairDataModule
from minilm_sts.module import SentenceEmbedder, load
from minilm_sts.version import __version__

__all__ = ["PairDataModule", "SentenceEmbedder", "load", "__version__"]
