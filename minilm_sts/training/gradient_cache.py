"""GradCache (Gao et al. 2021, as sentence-transformers' Cached* losses): an in-batch loss over a batch too large
to embed with autograd at once, with the loss and gradients of embedding it at once.

1. Embed the batch a mini-batch at a time without autograd, noting the random state before each.
2. Compute the loss on those embeddings and its gradient with respect to them (small: one vector per sentence).
3. In the backward pass, embed each mini-batch again with autograd under the same random state (so dropout draws
   the same masks) and push the cached gradients through it.

Only one mini-batch's activations are alive at a time. Step 3 runs inside the backward of a small autograd
function that hands the parameters the sum of their gradients in one piece, as a backward of the whole batch
would: Lightning's loss scaling, gradient clipping and accumulation, and DDP's gradient reduction, which must see
each parameter's gradient once per backward, all work unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from minilm_sts.model.bert import HostBuiltLayout


class MiniBatchLayout(HostBuiltLayout):
    """A batch's layout (`whole`) and the layouts of its runs of `size` sentences in batch order (`parts`: first
    sentence, end sentence, first token, end token, layout), all made on the host like any batch layout, so the
    step reads no sizes back from the device. `batch_layout` is the encoder's, which makes each of them."""

    def __init__(self, lengths: torch.Tensor, size: int, batch_layout: Callable[[torch.Tensor], HostBuiltLayout]):
        self.whole = batch_layout(lengths)
        host = lengths.cpu()
        ends = [0, *host.cumsum(0).tolist()]
        self.parts = [(first, min(first + size, len(host)), ends[first], ends[min(first + size, len(host))],
                       batch_layout(host[first : first + size])) for first in range(0, len(host), size)]
        if lengths.device.type != "cpu":
            self._apply_in_place(lambda x: x.to(lengths.device, non_blocking=True))

    def _apply_in_place(self, move) -> "MiniBatchLayout":
        self.whole = copy.copy(self.whole)._apply_in_place(move)
        self.parts = [(*bounds, copy.copy(layout)._apply_in_place(move)) for *bounds, layout in self.parts]
        return self

    def pieces(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> Iterator[tuple]:
        """Each mini-batch as (token ids, lengths, layout), what an encoder call takes."""
        for first, end, token_first, token_end, layout in self.parts:
            yield input_ids[token_first:token_end], lengths[first:end], layout


def whole_layout(layout: Optional[HostBuiltLayout]) -> Optional[HostBuiltLayout]:
    """The layout of the whole batch, whichever kind the loader made."""
    return layout.whole if isinstance(layout, MiniBatchLayout) else layout


class RandomState:
    """The random generators' state on the host and, for a CUDA device, on the device, to draw again from."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Draw from this state inside; the generators are back where they were afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.host)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def embed_in_pieces(embed: Callable[..., torch.Tensor], pieces: list[tuple],
                    states: Optional[list] = None) -> torch.Tensor:
    """`embed` of each mini-batch (`MiniBatchLayout.pieces`) without autograd, joined in batch order; with
    `states`, each mini-batch's random state goes there first. Each result is copied, because compiled code with
    CUDA graphs reuses its output memory at the next call."""
    embeddings = []
    with torch.no_grad():
        for piece in pieces:
            if states is not None:
                states.append(RandomState(piece[0].device))
            embeddings.append(embed(*piece).clone())
    return torch.cat(embeddings)


def cached_loss(encoder: nn.Module, pieces: list[tuple],
                loss_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`loss_of(the encoder's embeddings of the batch)`, the batch given as its mini-batches (`pieces`), by
    GradCache: its value now, its parameter gradients when the caller runs backward on it. `loss_of` may itself
    gather across processes (every process runs this step at the same time)."""
    states: list[RandomState] = []
    embeddings = embed_in_pieces(encoder, pieces, states).requires_grad_()
    with torch.enable_grad():
        loss = loss_of(embeddings)
        (cached,) = torch.autograd.grad(loss, embeddings)
    device = embeddings.device.type
    autocast = (torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
    params = [p for p in encoder.parameters() if p.requires_grad]
    cached = cached.split([len(lengths) for _, lengths, _ in pieces])
    replay = functools.partial(_replay, encoder, pieces, states, cached, params, autocast)
    return _ReplayedBackward.apply(loss.detach(), replay, *params)


def _replay(encoder: nn.Module, pieces: list, states: list, cached: tuple, params: list, autocast: tuple,
            grad_output: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """The parameters' gradients: each mini-batch embedded again, as in the first pass (random state and
    autocast), and its cached gradients, times the loss's own (Lightning's fp16 loss scale), pushed through."""
    device, (dtype, enabled) = pieces[0][0].device.type, autocast
    total: list[Optional[torch.Tensor]] = [None] * len(params)
    for piece, state, grad in zip(pieces, states, cached):
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), state.replayed():
            embeddings = encoder(*piece)
        grads = torch.autograd.grad(embeddings, params, (grad * grad_output).to(embeddings.dtype), allow_unused=True)
        total = [a if b is None else b if a is None else a.add_(b) for a, b in zip(total, grads)]
    return total


class _ReplayedBackward(torch.autograd.Function):
    """The loss value; its backward calls `replay(grad_output)` for the parameters' gradients."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, replay: Callable, *params: torch.Tensor) -> torch.Tensor:
        ctx.replay = replay
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return None, None, *ctx.replay(grad_output)
