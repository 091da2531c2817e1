"""BERT encoder in plain torch, with Hugging Face's parameter names so that `model.safetensors` loads strictly.

Leaf to root: layouts -> embeddings -> self-attention -> feed-forward -> layer -> BertEncoder (the layer
stack) -> BertModel (embeddings, encoder, pooler), named and nested as in Hugging Face's BertModel.

A layout says how a batch of sentences sits in memory. `PaddedLayout` is the usual (B, L) right-padded
batch, where every projection also runs on padding. `PackedLayout` keeps only the real tokens, (T, D) with
T the sum of sentence lengths: projections, feed-forward and LayerNorm run on real tokens alone, and only
attention scatters them into small padded blocks of similar-length sentences for
`scaled_dot_product_attention`. Both compute the same embeddings; packing does less work when sentence
lengths vary, which they always do.

Over 300 lines because the model reads best whole, leaf to root, as Hugging Face's modeling_bert does.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from minilm_sts.model.cpu_kernels import Dropout, Linear
from minilm_sts.model.pooling import mean_pool

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
        self.key_mask = attention_mask.bool()[:, None, None, :]  # broadcast over heads and query positions
        self.positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)

    def arrange(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dropout: float) -> torch.Tensor:
        return attend_padded(q, k, v, heads, self.key_mask, dropout)

    def mean_pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return mean_pool(hidden, self.attention_mask)


class HostBuiltLayout:
    """Bookkeeping about a batch's sentence lengths that reads sizes, so it is worked out on the host (in the
    training loader's workers) and moved to the device with the batch, as Lightning moves a batch: then no
    step on the device waits for a size to be read back."""

    def _apply_in_place(self, move) -> "HostBuiltLayout":
        raise NotImplementedError

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "HostBuiltLayout":
        """A copy on `device`. Copies are asynchronous by default, since the loader pins the batch."""
        return copy.copy(self)._apply_in_place(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "HostBuiltLayout":
        """A copy in page-locked memory, as a DataLoader with `pin_memory=True` asks of each batch."""
        return copy.copy(self)._apply_in_place(torch.Tensor.pin_memory)


class PaddingPlan(HostBuiltLayout):
    """Where packed sentences go in a right-padded (B, W) batch, W the longest length rounded up to a multiple
    of `width_multiple` (few widths, so that compiled code sees few shapes)."""

    def __init__(self, lengths: torch.Tensor, width_multiple: int = 1):
        device, lengths = lengths.device, lengths.cpu()
        width = -(-int(lengths.max()) // width_multiple) * width_multiple
        mask = torch.arange(width) < lengths[:, None]
        self.slots = mask.flatten().nonzero().squeeze(1)  # row-major: each sentence fills its own row, in order
        self.attention_mask = mask.long()
        if device.type != "cpu":
            self._apply_in_place(lambda x: x.to(device, non_blocking=True))

    def _apply_in_place(self, move) -> "PaddingPlan":
        self.slots, self.attention_mask = move(self.slots), move(self.attention_mask)
        return self

    def pad(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed `input_ids` as a padded batch, and its 0/1 attention mask."""
        flat = input_ids.new_zeros(self.attention_mask.numel()).index_copy_(0, self.slots, input_ids)
        return flat.view(self.attention_mask.shape), self.attention_mask


class PackedLayout(HostBuiltLayout):
    """Only real tokens: the input holds sentence i's `lengths[i]` token ids end to end.

    Inside the encoder the sentences are reordered shortest first, so that attention can take them in
    contiguous groups of `group_size`, each padded only to its own longest sentence: a long outlier pads its
    own group, not the whole batch. Pooling puts every sentence back in its place.
    """

    def __init__(self, lengths: torch.Tensor, group_size: int = 16):
        # The bookkeeping is many tiny steps that read sizes back: on a GPU each would wait for the device, so it
        # runs on the host, in numpy, whose small-array steps cost far less than torch's. The training loader
        # builds it there, in its workers, and `to` moves only the results.
        device, self.lengths = lengths.device, lengths.cpu()
        sizes = self.lengths.numpy()
        order = np.argsort(sizes, kind="stable")
        sorted_sizes = sizes[order]
        sentence = np.repeat(order, sorted_sizes)  # each row's sentence, in encoder order
        row_starts = np.cumsum(sorted_sizes) - sorted_sizes
        positions = np.arange(len(sentence)) - np.repeat(row_starts, sorted_sizes)
        input_starts = np.cumsum(sizes) - sizes
        self.sentence, self.positions = torch.from_numpy(sentence), torch.from_numpy(positions)
        self.token_order = torch.from_numpy(input_starts[sentence] + positions)  # encoder row -> input position
        self.groups = []
        for first in range(0, len(order), group_size):
            group_sizes = sorted_sizes[first : first + group_size]
            width, begin = int(group_sizes[-1]), int(row_starts[first])
            # Sorted, so a group whose shortest sentence is as long as its longest needs no padding or mask.
            padding = None if group_sizes[0] == width else self._padding(group_sizes, positions, begin, width)
            self.groups.append((begin, len(group_sizes), width, padding))
        if device.type != "cpu":
            self._apply_in_place(lambda x: x.to(device, non_blocking=True))

    @staticmethod
    def _padding(group_sizes: np.ndarray, positions: np.ndarray, begin: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each of the group's rows goes in its padded (count * width) block, and the block's key mask."""
        rank = np.repeat(np.arange(len(group_sizes)), group_sizes)
        slots = rank * width + positions[begin : begin + int(group_sizes.sum())]
        mask = (np.arange(width) < group_sizes[:, None])[:, None, None, :]
        return torch.from_numpy(slots), torch.from_numpy(mask)

    def _apply_in_place(self, move) -> "PackedLayout":
        self.lengths, self.sentence, self.positions, self.token_order = (
            move(x) for x in (self.lengths, self.sentence, self.positions, self.token_order))
        self.groups = [(begin, count, width, None if padding is None else tuple(move(x) for x in padding))
                       for begin, count, width, padding in self.groups]
        return self

    def arrange(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids[self.token_order]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dropout: float) -> torch.Tensor:
        return torch.cat([attend_group(q, k, v, heads, dropout, *group) for group in self.groups])

    def mean_pool(self, hidden: torch.Tensor) -> torch.Tensor:
        sums = hidden.new_zeros(len(self.lengths), hidden.shape[-1]).index_add(0, self.sentence, hidden)
        return sums / self.lengths.unsqueeze(1).to(hidden.dtype).clamp(min=1e-9)


def attend_group(q, k, v, heads: int, dropout: float, begin: int, count: int, width: int, padding) -> torch.Tensor:
    """Attention for one group of a PackedLayout: its rows are scattered into a padded block unless they
    already form one."""
    if padding is None:
        blocks = [x[begin : begin + count * width].view(count, width, -1) for x in (q, k, v)]
        return attend_padded(*blocks, heads, None, dropout).reshape(count * width, -1)
    slots, mask = padding
    blocks = [x.new_zeros(count * width, x.shape[-1]).index_copy(0, slots, x[begin : begin + len(slots)])
              .view(count, width, -1) for x in (q, k, v)]
    return attend_padded(*blocks, heads, mask, dropout).reshape(count * width, -1)[slots]


def attend_padded(q, k, v, heads: int, mask: torch.Tensor, dropout: float) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, L, D) blocks, with a boolean key mask (or None)."""
    batch, length, dim = q.shape
    q, k, v = (x.view(batch, length, heads, dim // heads).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(batch, length, dim)


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: token type 0 everywhere, as the reference passes all-zero token_type_ids.
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        dropout = self.dropout_p if self.training else 0.0
        return layout.attend(self.query(x), self.key(x), self.value(x), self.num_heads, dropout)


class DenseResidualNorm(nn.Module):
    """Projection, dropout, residual add, then LayerNorm: BERT's post-LN 'output' block."""

    def __init__(self, cfg: BertConfig, in_features: int):
        super().__init__()
        self.dense = Linear(in_features, cfg.hidden_size)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        projected = self.dropout(self.dense(hidden))
        # Without autograd nothing else reads the projection, so the sum can reuse its buffer (4% faster encode).
        return self.LayerNorm(projected + residual if torch.is_grad_enabled() else projected.add_(residual))


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
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact erf GELU, as config "gelu" means in BERT; in place when no gradient needs the projection.
        projected = self.dense(x)
        return F.gelu(projected) if torch.is_grad_enabled() else torch.ops.aten.gelu_(projected)


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseResidualNorm(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of transformer layers."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, layout)
        return x


class Pooler(nn.Module):
    """BERT's [CLS] pooler. Sentence embeddings never use it; its weights are kept (frozen) so that an
    exported folder is a complete BertModel checkpoint."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense.requires_grad_(False)


class BertModel(nn.Module):
    """Embeddings, the layer stack and the pooler: what Hugging Face's BertModel holds, under the same names."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = BertEncoder(cfg)
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
        """Token embeddings as the layout arranges them: (B, L, D) for a PaddedLayout, (T, D) for a PackedLayout
        (in its shortest-sentence-first order)."""
        return self.encoder(self.embeddings(layout.arrange(input_ids), layout.positions), layout)

    def sentence_embeddings(self, input_ids: torch.Tensor, layout) -> torch.Tensor:
        """Mean-pooled, unnormalised sentence embeddings (B, D)."""
        return layout.mean_pool(self(input_ids, layout))

    def load_safetensors(self, path: Path) -> None:
        """Load Hugging Face BertModel weights, failing loudly on any missing or unexpected key."""
        state = {k: v for k, v in load_file(str(path)).items() if k not in DERIVED_KEYS}
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        self.load_state_dict(state, strict=True)
