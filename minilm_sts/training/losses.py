"""The training losses: each a function of the two columns' sentence embeddings and the pair labels.

Every loss takes `u`, `v` (the pooled embeddings of sentence A and B, shape [batch, dim]) and `labels` (float
[batch]), plus keyword parameters, and returns a scalar in fp32 even under autocast. `LOSSES` names them;
`build_loss` turns a name and its parameters into the loss function a training step calls; `build_losses` does
it for a run, which has one loss for every training set or one per named set. To add a loss, write its function
under `@_in_fp32` and add one `LOSSES` entry. Its keyword-only parameters named in `STEP_INPUTS` are what the
training step hands it (negatives, clusters, guide embeddings, a dict for metrics); every other is the user's,
checked by `build_loss` from its annotation: a bool is a flag, a Literal a choice, a number positive (or 0 where
0 is the default).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, get_args, get_origin

import torch
import torch.nn.functional as F

from minilm_sts.errors import UserInputError


def _in_fp32(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `loss` on embeddings in fp32 (or finer) and flat fp32 labels with autocast off: under autocast a matrix
    product would otherwise drop back to half precision, and small differences between similarities decide these
    losses. fp64 embeddings stay fp64, for comparisons below fp32 rounding."""

    def at_least_fp32(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() and x.element_size() < 4 else x

    @functools.wraps(loss)
    def in_fp32(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, **params) -> torch.Tensor:
        params = {key: at_least_fp32(value) for key, value in params.items()}  # negatives and guide embeddings too
        with torch.autocast(u.device.type, enabled=False):
            return loss(at_least_fp32(u), at_least_fp32(v), labels.float().view(-1), **params)

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


def _require_positive_pairs(name: str, labels: torch.Tensor) -> None:
    """In-batch losses take every row as a positive pair (the data side keeps only rows labelled > 0, and no
    sentence twice in a batch, which would make it its own negative); labels serve only for this check."""
    non_positive = (labels <= 0).nonzero().flatten()
    if len(non_positive):
        raise ValueError(f"{name} takes positive pairs only, but the batch rows {non_positive.tolist()} have "
                         "labels <= 0")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gathered(x: Optional[torch.Tensor], across_devices: bool, with_grad: bool = False) -> Optional[torch.Tensor]:
    """`x` of every process, rank after rank, where `across_devices` under a process group; else `x` itself.
    `with_grad`: gradients flow back to each process's own rows (all-gather's backward sums them there)."""
    if x is None or not (across_devices and _distributed()):
        return x
    if with_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _rank_offset(batch: int, across_devices: bool) -> int:
    """Where this process's rows start among the gathered ones (all processes hold batches of one size)."""
    return torch.distributed.get_rank() * batch if across_devices and _distributed() else 0


def _known_duplicates(clusters: Optional[torch.Tensor], mask: bool) -> Optional[torch.Tensor]:
    """The clusters where `mask_known_duplicates` asks for them, which the batch must then carry."""
    if mask and clusters is None:
        raise ValueError("mask_known_duplicates needs each sentence's duplicate cluster, but the batch has none")
    return clusters if mask else None


def _columns(x: Optional[torch.Tensor], batch: int) -> tuple:
    """Column-major rows (anchors, positives, then every negative column) split as (anchors, positives,
    negatives or None); None stays None."""
    if x is None:
        return None, None, None
    return x[:batch], x[batch : 2 * batch], x[2 * batch :] if len(x) > 2 * batch else None


def _candidates(positives: torch.Tensor, negatives: Optional[torch.Tensor], across_devices: bool,
                with_grad: bool = False) -> torch.Tensor:
    """The documents every anchor ranks: all positives, then all negatives (of every process where gathered)."""
    parts = [positives] if negatives is None else [positives, negatives]
    return torch.cat([_gathered(part, across_devices, with_grad) for part in parts])


def _same_cluster(rows: Optional[torch.Tensor], columns: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Known duplicates: True where a row and a column sentence share a cluster (None without clusters)."""
    return None if rows is None else rows[:, None] == columns[None, :]


def _either(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else a if b is None else a | b


def _drop_false_negatives(logits: torch.Tensor, false_negative: Optional[torch.Tensor], own: Optional[torch.Tensor],
                          keep_own: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` with the false negatives set to -inf, and how many there were. Row i's own column `own[i]` (its
    positive, or itself), where it has one, never counts as one: it stays where `keep_own`, else it goes too."""
    if false_negative is None and keep_own:
        return logits, logits.new_zeros((), dtype=torch.long)
    own_mask = torch.zeros_like(logits, dtype=torch.bool)
    if own is not None:
        own_mask[torch.arange(len(own), device=logits.device), own] = True
    masked = torch.zeros_like(own_mask) if false_negative is None else false_negative & ~own_mask
    return logits.masked_fill(masked if keep_own else masked | own_mask, -math.inf), masked.sum()


def _record(metrics: Optional[dict], **values: torch.Tensor) -> None:
    """Put device scalars for the step to log (at logging steps only, so nothing is read back on the others)."""
    if metrics is not None:
        metrics.update(values)


@_in_fp32
def mnrl_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, *, scale: float = 20.0,
              symmetric: bool = False, mask_known_duplicates: bool = False, gather_across_devices: bool = False,
              negatives: Optional[torch.Tensor] = None, clusters: Optional[torch.Tensor] = None,
              metrics: Optional[dict] = None) -> torch.Tensor:
    """In-batch negatives (sentence-transformers' MultipleNegativesRankingLoss, cosine similarity).

    Every row must be a positive pair: sentence A of row i is to pick its own sentence B among all B's of the
    batch and all its `negatives` (hard negatives: each row's extra columns, column-major), by a softmax over
    scale * cosine. With `symmetric`, each B also picks its own A among all A's, and the loss is the mean of the
    two directions (MultipleNegativesSymmetricRankingLoss). With `mask_known_duplicates`, a candidate in the
    anchor's duplicate cluster (`clusters`, one id per sentence in the same order) other than its own B is left
    out of the softmax, and `metrics["masked"]` counts them. With `gather_across_devices`, under a process group
    the candidates of every process take part, with gradients.
    """
    _require_positive_pairs("mnrl", labels)
    batch, offset = len(u), _rank_offset(len(u), gather_across_devices)
    own = torch.arange(offset, offset + batch, device=u.device)
    anchor_ids, positive_ids, negative_ids = _columns(_known_duplicates(clusters, mask_known_duplicates), batch)
    candidate_ids = None if anchor_ids is None else _candidates(positive_ids, negative_ids, gather_across_devices)
    logits = scale * _unit(u) @ _unit(_candidates(v, negatives, gather_across_devices, with_grad=True)).T
    logits, masked = _drop_false_negatives(logits, _same_cluster(anchor_ids, candidate_ids), own)
    loss = F.cross_entropy(logits, own)
    if symmetric:  # each B against all A's: the positives' rows of the A-to-B scores, with A's gathered too
        anchors = _gathered(u, gather_across_devices, with_grad=True)
        backward = (scale * _unit(anchors) @ _unit(v).T).T
        all_anchor_ids = _gathered(anchor_ids, gather_across_devices)
        backward, masked_back = _drop_false_negatives(backward, _same_cluster(positive_ids, all_anchor_ids), own)
        loss, masked = (loss + F.cross_entropy(backward, own)) / 2, masked + masked_back
    if mask_known_duplicates:
        _record(metrics, masked=masked)
    return loss


def _guide_threshold(guided_positive: torch.Tensor, strategy: str, margin: float) -> torch.Tensor:
    """The guide's score above which a candidate counts as a false negative: its anchor's positive's score,
    less `margin` (absolute) or less `margin` times that score's magnitude (relative)."""
    return guided_positive - (margin if strategy == "absolute" else guided_positive.abs() * margin)


@_in_fp32
def gist_loss(u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.01,
              margin_strategy: Literal["absolute", "relative"] = "absolute", margin: float = 0.0,
              contrast_anchors: bool = True, contrast_positives: bool = True, mask_known_duplicates: bool = False,
              gather_across_devices: bool = False, negatives: Optional[torch.Tensor] = None,
              clusters: Optional[torch.Tensor] = None, guide: Optional[torch.Tensor] = None,
              metrics: Optional[dict] = None) -> torch.Tensor:
    """GIST (sentence-transformers' GISTEmbedLoss): in-batch negatives whose false negatives a frozen guide model
    picks out. Anchor i picks its positive among all positives and `negatives`, and by default also against the
    other anchors (`contrast_anchors`) and, from its positive's side, the other positives (`contrast_positives`),
    by a softmax over cosine / temperature. A candidate that the guide (its embeddings `guide`, in the same
    column order as u, v, negatives) scores above the anchor's positive, within the margin, is left out, and with
    `mask_known_duplicates` so is one in the anchor's cluster; `metrics["masked"]` counts them."""
    _require_positive_pairs("gist", labels)
    if guide is None:
        raise ValueError("gist needs the guide model's embeddings of the batch")
    batch, offset = len(u), _rank_offset(len(u), gather_across_devices)
    own, rows = torch.arange(offset, offset + batch, device=u.device), torch.arange(batch, device=u.device)
    guide_anchors, guide_positives, guide_negatives = _columns(guide, batch)
    all_guide_positives = _gathered(guide_positives, gather_across_devices)
    all_positives = _gathered(v, gather_across_devices, with_grad=True)
    anchor_ids, positive_ids, negative_ids = _columns(_known_duplicates(clusters, mask_known_duplicates), batch)
    all_positive_ids = _gathered(positive_ids, gather_across_devices)
    guided_positive = (_unit(guide_anchors) @ _unit(all_guide_positives).T).diagonal(offset)
    threshold = _guide_threshold(guided_positive, margin_strategy, margin)[:, None]

    def block(left, right, guide_left, guide_right, left_ids, right_ids, own_columns, keep_own):
        """Cosines of the rows of `left` with those of `right`, false negatives dropped, and their count."""
        guided = _unit(guide_left) @ _unit(guide_right).T
        false_negative = _either(guided > threshold, _same_cluster(left_ids, right_ids))
        return _drop_false_negatives(_unit(left) @ _unit(right).T, false_negative, own_columns, keep_own)

    blocks = [block(u, all_positives, guide_anchors, all_guide_positives, anchor_ids, all_positive_ids, own, True)]
    if contrast_anchors:
        blocks.append(block(u, u, guide_anchors, guide_anchors, anchor_ids, anchor_ids, rows, False))
    if contrast_positives:
        blocks.append(block(v, all_positives, guide_positives, all_guide_positives, positive_ids, all_positive_ids,
                            own, False))
    if negatives is not None:
        blocks.append(block(u, _gathered(negatives, gather_across_devices, with_grad=True), guide_anchors,
                            _gathered(guide_negatives, gather_across_devices), anchor_ids,
                            _gathered(negative_ids, gather_across_devices), None, True))
    scores, counts = zip(*blocks)
    _record(metrics, masked=sum(counts))
    return F.cross_entropy(torch.cat(scores, dim=1) / temperature, own)


# What a training step can hand a loss beside u, v and labels; a loss takes those it names as keyword-only
# parameters (defaulting to None), and every other keyword-only parameter is the user's.
STEP_INPUTS = {
    "negatives": "the embeddings of the rows' negative columns, column-major",
    "clusters": "each sentence's duplicate cluster id, in the batch's column-major order",
    "guide": "the frozen guide model's embeddings of every column, in the same order",
    "metrics": "a dict in which the loss leaves device scalars to log, such as the masked count",
}
# What the training step, not the loss function, does with an in-batch loss: embed the batch this many sentences
# at a time, without keeping activations, then again with them one mini-batch at a time (GradCache); the loss
# and its gradients are those of the whole batch at once. 0: the whole batch in one go.
MINI_BATCH_SIZE = inspect.Parameter("mini_batch_size", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=int)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. `in_batch_negatives`: every row must be a positive pair, and the other rows of the
    batch are its negatives (so the data side drops label-0 rows and keeps duplicates out of a batch); such a
    loss also takes `mini_batch_size`."""

    compute: Callable[..., torch.Tensor]
    in_batch_negatives: bool = False

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The user's parameters of the loss, with their defaults and types."""
        own = {p.name: p for p in inspect.signature(self.compute, eval_str=True).parameters.values()
               if p.kind is p.KEYWORD_ONLY and p.name not in STEP_INPUTS}
        return {**own, MINI_BATCH_SIZE.name: MINI_BATCH_SIZE} if self.in_batch_negatives else own

    def inputs(self) -> frozenset[str]:
        """The step inputs (STEP_INPUTS) the loss takes."""
        return frozenset(inspect.signature(self.compute).parameters) & STEP_INPUTS.keys()


LOSSES: dict[str, LossSpec] = {
    "cosine_mse": LossSpec(cosine_mse_loss),
    "cosent": LossSpec(cosent_loss),
    "angle": LossSpec(angle_loss),
    "mnrl": LossSpec(mnrl_loss, in_batch_negatives=True),
    "gist": LossSpec(gist_loss, in_batch_negatives=True),
}


class BoundLoss(functools.partial):
    """A loss's function with the user's parameters bound (a functools.partial): `loss(u, v, labels,
    **step_inputs)` passes it the step inputs it takes (`inputs`) and leaves out the others. `mini_batch_size` is
    for the training step (GradCache), not the function."""

    def __new__(cls, spec: LossSpec, params: Mapping[str, object], mini_batch_size: int = 0) -> "BoundLoss":
        bound = super().__new__(cls, spec.compute, **params)
        bound.spec, bound.inputs, bound.mini_batch_size = spec, spec.inputs(), mini_batch_size
        return bound

    def __reduce__(self):  # partial's own would call BoundLoss(func) (a copy of the module copies its losses)
        return BoundLoss, (self.spec, self.keywords, self.mini_batch_size)

    def __call__(self, u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, **step_inputs) -> torch.Tensor:
        return super().__call__(u, v, labels, **{name: x for name, x in step_inputs.items() if name in self.inputs})


def build_loss(name: str, params: Optional[Mapping[str, object]] = None) -> BoundLoss:
    """The loss `name` with `params` bound; a UserInputError names the valid choices for an unknown loss or
    parameter, and says what a parameter expects for a value of the wrong kind."""
    if name not in LOSSES:
        raise UserInputError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    accepted = LOSSES[name].parameters()
    params = dict(params or {})
    for key, value in params.items():
        if key not in accepted:
            valid = ", ".join(accepted) if accepted else "none"
            raise UserInputError(f"loss {name!r} has no parameter {key!r}; its parameters: {valid}")
        _check_value(name, key, value, accepted[key])
    mini_batch_size = params.pop(MINI_BATCH_SIZE.name, 0)
    return BoundLoss(LOSSES[name], params, mini_batch_size)


def loss_of_set(loss: str | Mapping[str, str], params: Optional[Mapping], train_set: str) -> tuple[str, dict]:
    """The loss name and parameters that `train_set` trains with. `loss` is one name for every set, with `params`
    its parameters, or a mapping set name: loss name, with `params` a mapping set name: parameters."""
    if isinstance(loss, str):
        return loss, dict(params or {})
    return loss[train_set], dict((params or {}).get(train_set) or {})


def build_losses(loss: str | Mapping[str, str], params: Optional[Mapping] = None) -> dict[Optional[str], BoundLoss]:
    """Each training set's loss function: {None: loss} when one loss serves every set, else {set name: loss}.
    Every name and parameter is checked here (a UserInputError otherwise), before any data is read. The loaders
    cut every batch of a run into mini-batches of one size, so the losses that cache agree on it."""
    if isinstance(loss, str):
        return {None: build_loss(loss, params)}
    if not loss:
        raise UserInputError("loss is an empty mapping; give a loss name, or a mapping training set name: loss name")
    strays = [name for name in (params or {}) if name not in loss]
    if strays:
        raise UserInputError(f"loss_params names training sets {strays} that loss does not; with one loss per set, "
                             f"loss_params maps set names to parameters: {{{', '.join(loss)}: ...}}")
    losses = {name: build_loss(*loss_of_set(loss, params, name)) for name in loss}
    sizes = {bound.mini_batch_size for bound in losses.values()} - {0}
    if len(sizes) > 1:
        raise UserInputError(f"the training sets' losses give different mini_batch_size values {sorted(sizes)}; "
                             "a run takes one")
    return losses


def _check_value(loss: str, key: str, value: object, parameter: inspect.Parameter) -> None:
    """A flag is true or false, a choice one of its Literal's values, and a number positive, or also 0 where 0
    is its default (none, or off); an int parameter takes whole numbers only."""
    kind, default = parameter.annotation, parameter.default
    if kind is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"loss {loss!r} parameter {key!r} must be true or false, got {value!r}")
    elif get_origin(kind) is Literal:
        if value not in get_args(kind):
            choices = ", ".join(repr(choice) for choice in get_args(kind))
            raise UserInputError(f"loss {loss!r} parameter {key!r} must be one of {choices}, got {value!r}")
    elif (isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float))
          or not (0 <= value if default == 0 else 0 < value) or not value < math.inf):
        expected = f"{'whole ' if kind is int else ''}{'number >= 0' if default == 0 else 'positive number'}"
        raise UserInputError(f"loss {loss!r} parameter {key!r} must be a {expected} (default {default}), "
                             f"got {value!r}")
