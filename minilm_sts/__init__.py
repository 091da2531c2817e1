"""Fine-tune sentence embedders (all-MiniLM-L6-v2 and other BERTs) with cosine-MSE on labelled pairs.

The package is layered, each layer importing only those below it (tests/test_layers.py checks this):
`cli` (the command line) -> `serving` (load, export, model card, predict) and `training` (the LightningModule,
losses, callbacks) -> `data` (sources, pair files, token cache, batching, the data module) -> `evaluation`
(pair metrics, duplicate retrieval) -> `model` (plain torch: BERT, pooling, tokenization, SentenceEncoder,
checkpoints); beneath them all, `errors`, `hardware`, `atomic`, `version` and `_compat`.
"""

from minilm_sts import _deprecated
from minilm_sts.data.pair_data_module import PairDataModule
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.serving.loading import load
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining
from minilm_sts.version import __version__

__all__ = ["PairDataModule", "SentenceEncoder", "SentenceEncoderTraining", "load", "__version__"]
__getattr__ = _deprecated.package_getattr
_deprecated.install()
