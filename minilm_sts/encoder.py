"""BERT encoder in plain torch, with Hugging Face's parameter names so that `model.safetensors` loads strictly.

Leaf to root: layouts -> embeddings -> self-attention -> feed-forward -> layer -> BertEncoder.

A layout says how a batch of sentences sits in memory. `PaddedLayout` is the usual (B, L) right-padded
batch, where every projection also runs on padding. `PackedLayout` keeps only the real tokens, (T, D) with
T the sum of sentence lengths: projections, feed-forward and LayerNorm run on real tokens alone, and only
attention scatters them into a padded (B, L) block for `scaled_dot_product_attention`. Both compute the same
embeddings; packing does less work when sentence lengths vary, which they always do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from minilm_sts.similarity import mean_pool

# Keys that Hugging Face checkpoints may carry but that hold no learned state:
# older BertModel saves include the position-id buffer, which we derive instead.
DERIVED_KEYS = frozenset({"embeddings.position_ids"})


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> "BertConfig":
        """Keep the fields we model; refuse architectures we would silently compute wrongly."""
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only the exact-erf 'gelu' activation is supported, got {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_folder(cls, folder: Path) -> "BertConfig":
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class PaddedLayout:
    """Right-padded (B, L) batches with a 0/1 attention mask."""

    def __init__(self, attention_mask: torch.Tensor):
        self.attention_mask = attention_mask
        self.mask = attention_mask.bool()[:, None, None, :]  # broadcast over heads and query positions
        self.positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_padded(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mean_pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, self.attention_mask)


class PackedLayout:
    """Only real tokens: sentence i holds the next `lengths[i]` rows of a (T, D) tensor."""

    def __init__(self, lengths: torch.Tensor):
        self.batch, self.width = len(lengths), int(lengths.max())
        self.sentence = torch.repeat_interleave(torch.arange(self.batch, device=lengths.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        self.positions = torch.arange(len(self.sentence), device=lengths.device) - starts[self.sentence]
        self.slots = self.sentence * self.width + self.positions  # each token's row in the padded block
        self.lengths = lengths
        self.mask = (torch.arange(self.width, device=lengths.device) < lengths[:, None])[:, None, None, :]

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(self.batch * self.width, x.shape[-1]).index_copy(0, self.slots, x)
        return padded.view(self.batch, self.width, -1)

    def from_padded(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.width, -1)[self.slots]

    def mean_pool(self, hidden: torch.Tensor) -> torch.Tensor:
        sums = hidden.new_zeros(self.batch, hidden.shape[-1]).index_add(0, self.sentence, hidden)
        return sums / self.lengths.unsqueeze(1).to(hidden.dtype).clamp(min=1e-9)


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: token type 0 everywhere, as the reference passes all-zero token_type_ids.
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        """Projections on x as laid out; attention per sentence on the padded block, masked to real keys."""
        q, k, v = (self._heads(layout.to_padded(proj(x))) for proj in (self.query, self.key, self.value))
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, dropout_p=dropout)
        batch, _, length, _ = out.shape
        return layout.from_padded(out.transpose(1, 2).reshape(batch, length, -1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)


class DenseResidualNorm(nn.Module):
    """Projection, dropout, residual add, then LayerNorm: BERT's post-LN 'output' block."""

    def __init__(self, cfg: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseResidualNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        return self.output(self.self(x, layout), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as config "gelu" means in BERT


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseResidualNorm(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class LayerStack(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    """BERT's [CLS] pooler. Sentence embeddings never use it; its weights are kept (frozen) so that an
    exported folder is a complete BertModel checkpoint."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense.requires_grad_(False)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)
        self.pooler = Pooler(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's truncated-normal-like init; only matters for models built without pretrained weights (tests).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, layout) -> torch.Tensor:
        """Token embeddings laid out like `input_ids`: (B, L, D) for a PaddedLayout, (T, D) for a PackedLayout."""
        x = self.embeddings(input_ids, layout.positions)
        for layer in self.encoder.layer:
            x = layer(x, layout)
        return x

    def sentence_embeddings(self, input_ids: torch.Tensor, layout) -> torch.Tensor:
        """Mean-pooled, unnormalised sentence embeddings (B, D)."""
        return layout.mean_pool(self(input_ids, layout))

    def load_safetensors(self, path: Path) -> None:
        """Load Hugging Face BertModel weights, failing loudly on any missing or unexpected key."""
        state = {k: v for k, v in load_file(str(path)).items() if k not in DERIVED_KEYS}
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        self.load_state_dict(state, strict=True)
