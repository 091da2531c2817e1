"""The frozen guide model of GIST: a copy of the base model whose similarities pick out false negatives."""

from __future__ import annotations

from typing import Optional

import torch

from minilm_sts.model.bert import HostBuiltLayout, PaddedLayout, PaddingPlan
from minilm_sts.model.sentence_encoder import SentenceEncoder


class Guide:
    """A SentenceEncoder that is never trained: deliberately not an nn.Module attribute of the LightningModule,
    so it is in neither the optimizer nor the checkpoint, and Lightning's train() leaves it in eval mode (no
    dropout). It follows the trained model's device and parameter dtype; under mixed precision, the step's
    autocast applies to it as to the trained model."""

    def __init__(self, pretrained: str, max_seq_length: int):
        # Building a BERT draws its initial weights: from a generator of its own, so that making the guide at the
        # first step leaves the training's random stream (dropout, and a resumed run's replay of it) as it was.
        with torch.random.fork_rng(devices=[]):
            self.encoder = SentenceEncoder.from_pretrained(pretrained, max_seq_length).eval().requires_grad_(False)

    @torch.no_grad()
    def embeddings(self, input_ids: torch.Tensor, lengths: torch.Tensor, layout: Optional[HostBuiltLayout],
                   like: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of packed sentences, on the device and in the dtype of `like` (a trained
        parameter). A padding plan (the trained model's compiled path) runs eagerly here: the guide compiles
        nothing."""
        weight = self.encoder.bert.embeddings.word_embeddings.weight
        if (weight.device, weight.dtype) != (like.device, like.dtype):
            self.encoder.to(like.device, like.dtype)
        if isinstance(layout, PaddingPlan):
            ids, mask = layout.pad(input_ids)
            return self.encoder.bert.sentence_embeddings(ids, PaddedLayout(mask))
        return self.encoder(input_ids, lengths, layout)
