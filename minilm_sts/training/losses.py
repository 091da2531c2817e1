"""The training losses: each a function of the two columns' sentence embeddings and the pair labels.

Every loss takes `u`, `v` (the pooled embeddings of sentence A and B, shape [batch, dim]) and `labels` (float
[batch]), plus keyword parameters, and returns a scalar in fp32 even under autocast. `LOSSES` names them;
`build_loss` turns a name and its parameters into the loss function a training step calls; `build_losses` does
it for a run, which has one loss for every training set or one per named set. To add a loss, write
its function under `@_in_fp32` and add one `LOSSES` entry: every numeric parameter is a positive scale and every
other is a flag, which is what `build_loss` checks.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from minilm_sts.errors import UserInputError

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _in_fp32(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `loss` on fp32 embeddings and flat fp32 labels with autocast off: under autocast a matrix product
    would otherwise drop back to half precision, and small differences between similarities decide these losses."""

    @functools.wraps(loss)
    def in_fp32(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, **params) -> torch.Tensor:
        with torch.autocast(u.device.type, enabled=False):
            return loss(u.float(), v.float(), labels.float().view(-1), **params)

    return in_fp32


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, with torch's default eps of 1e-12 as the reference's cosine uses."""
    return F.normalize(x, p=2, dim=1)


@_in_fp32
def cosine_mse_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between cos(u, v) and the labels (sentence-transformers' CosineSimilarityLoss)."""
    return F.mse_loss(F.cosine_similarity(u, v, dim=1), labels)


def _ranking_loss(scores: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """log(1 + sum over pairs (i, j) with labels[i] < labels[j] of exp(scale * (scores[i] - scores[j]))).

    Only the order of the labels matters: each pair of rows whose scores rank against their labels adds to the
    loss. Rows with equal labels are not compared; with all labels equal the loss is log 1 = 0."""
    scaled = scores * scale
    differences = scaled[:, None] - scaled[None, :]
    differences = differences.masked_fill(labels[:, None] >= labels[None, :], -math.inf)
    return torch.logsumexp(torch.cat([differences.new_zeros(1), differences.flatten()]), dim=0)


@_in_fp32
def cosent_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, *, scale: float = 20.0) -> torch.Tensor:
    """CoSENT (sentence-transformers' CoSENTLoss): the ranking loss above on the cosine similarities."""
    return _ranking_loss((_unit(u) * _unit(v)).sum(dim=1), labels, scale)


def _angle_similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """AnglE's score: each unit vector read as complex numbers (first half real parts, second half imaginary
    parts, an odd width padded with a zero), z = sum_k u_k * conj(v_k), score |Re z + Im z|. Re z is the cosine;
    Im z carries the angle difference in the complex plane, which stays informative where the cosine saturates."""
    u, v = _unit(u), _unit(v)
    if u.shape[1] % 2:
        u, v = F.pad(u, (0, 1)), F.pad(v, (0, 1))
    z = (torch.complex(*u.chunk(2, dim=1)) * torch.complex(*v.chunk(2, dim=1)).conj()).sum(dim=1)
    return (z.real + z.imag).abs()


@_in_fp32
def angle_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, *, scale: float = 20.0) -> torch.Tensor:
    """AnglE (sentence-transformers' AnglELoss): the ranking loss above on AnglE's score."""
    return _ranking_loss(_angle_similarity(u, v), labels, scale)


@_in_fp32
def mnrl_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, *, scale: float = 20.0,
              symmetric: bool = False) -> torch.Tensor:
    """In-batch negatives (sentence-transformers' MultipleNegativesRankingLoss, cosine similarity).

    Every row must be a positive pair: sentence A of row i is to pick its own sentence B among all B's of the
    batch, by a softmax over scale * cos(u_i, v_j). So rows labelled 0 must not reach this loss (the data side
    keeps only positive rows, and must not put the same sentence twice in a batch, which would make it its own
    negative); labels serve only to check that none is <= 0. With `symmetric`, each B also picks its own A
    among all A's, and the loss is the mean of the two directions (MultipleNegativesSymmetricRankingLoss).
    """
    non_positive = (labels <= 0).nonzero().flatten()
    if len(non_positive):
        raise ValueError(f"mnrl takes positive pairs only, but the batch rows {non_positive.tolist()} have "
                         "labels <= 0")
    logits = scale * _unit(u) @ _unit(v).T
    own = torch.arange(len(logits), device=logits.device)
    loss = F.cross_entropy(logits, own)
    return (loss + F.cross_entropy(logits.T, own)) / 2 if symmetric else loss


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. `in_batch_negatives`: every row must be a positive pair, and the other rows of the
    batch are its negatives (so the data side drops label-0 rows and keeps duplicates out of a batch)."""

    compute: Callable[..., torch.Tensor]
    in_batch_negatives: bool = False

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The loss's own keyword parameters (after u, v, labels), with their defaults."""
        return {p.name: p for p in inspect.signature(self.compute).parameters.values() if p.kind is p.KEYWORD_ONLY}


LOSSES: dict[str, LossSpec] = {
    "cosine_mse": LossSpec(cosine_mse_loss),
    "cosent": LossSpec(cosent_loss),
    "angle": LossSpec(angle_loss),
    "mnrl": LossSpec(mnrl_loss, in_batch_negatives=True),
}


def build_loss(name: str, params: Optional[Mapping[str, object]] = None) -> PairLoss:
    """The loss `name` with `params` bound, as `loss(u, v, labels)`; a UserInputError names the valid choices
    for an unknown loss or parameter, and says what a parameter expects for a value of the wrong kind."""
    if name not in LOSSES:
        raise UserInputError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    accepted = LOSSES[name].parameters()
    for key, value in (params or {}).items():
        if key not in accepted:
            valid = ", ".join(accepted) if accepted else "none"
            raise UserInputError(f"loss {name!r} has no parameter {key!r}; its parameters: {valid}")
        _check_value(name, key, value, accepted[key].default)
    return functools.partial(LOSSES[name].compute, **(params or {}))


def loss_of_set(loss: str | Mapping[str, str], params: Optional[Mapping], train_set: str) -> tuple[str, dict]:
    """The loss name and parameters that `train_set` trains with. `loss` is one name for every set, with `params`
    its parameters, or a mapping set name: loss name, with `params` a mapping set name: parameters."""
    if isinstance(loss, str):
        return loss, dict(params or {})
    return loss[train_set], dict((params or {}).get(train_set) or {})


def build_losses(loss: str | Mapping[str, str], params: Optional[Mapping] = None) -> dict[Optional[str], PairLoss]:
    """Each training set's loss function: {None: loss} when one loss serves every set, else {set name: loss}.
    Every name and parameter is checked here (a UserInputError otherwise), before any data is read."""
    if isinstance(loss, str):
        return {None: build_loss(loss, params)}
    if not loss:
        raise UserInputError("loss is an empty mapping; give a loss name, or a mapping training set name: loss name")
    strays = [name for name in (params or {}) if name not in loss]
    if strays:
        raise UserInputError(f"loss_params names training sets {strays} that loss does not; with one loss per set, "
                             f"loss_params maps set names to parameters: {{{', '.join(loss)}: ...}}")
    return {name: build_loss(*loss_of_set(loss, params, name)) for name in loss}


def _check_value(loss: str, key: str, value: object, default: object) -> None:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserInputError(f"loss {loss!r} parameter {key!r} must be true or false, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserInputError(f"loss {loss!r} parameter {key!r} must be a positive number (default {default}), "
                             f"got {value!r}")
