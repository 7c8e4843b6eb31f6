"""KGC training losses over positive scores ``[B]`` and negative scores ``[B, n]``, and NS-KGE's
non-sampling loss over every entity (:class:`NonSamplingLoss`, closed forms per model).

Scores are "higher is more plausible"; distance models already include their margin
``gamma`` in the score (``gamma - d``), see :mod:`pipeline.models.distance`. Optional
subsampling weights ``[B]`` turn the batch mean into a weighted mean (RotatE code).
"""
from __future__ import annotations

import abc

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import ConfigError
from pipeline.models.distance import TransE
from pipeline.models.semantic import BilinearModel
from pipeline.registry import Registry


class KGCLoss(nn.Module, abc.ABC):
    """A loss over one batch's positive and negative scores."""

    @abc.abstractmethod
    def forward(self, positive: torch.Tensor, negative: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss from ``positive [B]``, ``negative [B, n]``, optional ``weights [B]``."""


def batch_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_row [B]``, weighted by ``weights [B]`` when given (``sum w x / sum w``)."""
    return per_row.mean() if weights is None else (weights * per_row).sum() / weights.sum()


LOSSES: Registry[KGCLoss] = Registry("loss")


@LOSSES.register("margin")
class MarginRankingLoss(KGCLoss):
    """Margin ranking: ``mean_b mean_i max(0, margin - s_pos_b + s_neg_bi)``.

    ``margin`` is ``train.gamma``. With distance models (``s = gamma - d``) this is the
    classic ``max(0, gamma + d_pos - d_neg)``.
    """

    def __init__(self, margin: float):
        super().__init__()
        self.margin = float(margin)

    def forward(self, positive: torch.Tensor, negative: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        per_row = F.relu(self.margin - positive.unsqueeze(1) + negative).mean(1)
        return batch_mean(per_row, weights)


@LOSSES.register("nssa")
class NegativeSamplingLoss(KGCLoss):
    """RotatE's negative-sampling loss, optionally self-adversarial.

    ``L_b = -log sigmoid(s_pos_b) - sum_i w_bi log sigmoid(-s_neg_bi)`` with
    ``w_b = softmax(alpha * s_neg_b)`` (detached) when ``self_adversarial``, else ``1/n``.
    The batch loss is ``(mean_b pos_b + mean_b neg_b) / 2`` as in the RotatE code, the means
    weighted by the subsampling weights when given. For distance models ``s = gamma - d``,
    i.e. ``-log sigmoid(gamma - d_pos) - sum_i w_i log sigmoid(d_neg_i - gamma)``.
    """

    def __init__(self, adversarial_temperature: float = 0.5, self_adversarial: bool = True):
        super().__init__()
        self.adversarial_temperature = float(adversarial_temperature)
        self.self_adversarial = bool(self_adversarial)

    def negative_weights(self, negative: torch.Tensor) -> torch.Tensor:
        """``w [B, n]``: detached softmax of ``alpha * s_neg`` over each row, or uniform ``1/n``."""
        if self.self_adversarial:
            return torch.softmax(negative.detach() * self.adversarial_temperature, dim=-1)
        return torch.full_like(negative, 1.0 / negative.shape[-1])

    def forward(self, positive: torch.Tensor, negative: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        positive_term = -F.logsigmoid(positive)
        negative_term = -(self.negative_weights(negative) * F.logsigmoid(-negative)).sum(-1)
        return (batch_mean(positive_term, weights) + batch_mean(negative_term, weights)) / 2


def build_loss(name: str, gamma: float, adversarial_temperature: float, self_adversarial: bool) -> KGCLoss:
    """The loss ``name`` with the ``train`` hyper-parameters it uses."""
    cls = LOSSES.get(name)
    if cls is MarginRankingLoss:
        return MarginRankingLoss(gamma)
    return NegativeSamplingLoss(adversarial_temperature, self_adversarial)


class SubsamplingWeights(nn.Module):
    """RotatE's frequency weights ``w(h, r, t) = 1 / sqrt(count(h, r) + count(t, r^-1))``.

    Counts come from TRAIN and start at 4 (RotatE code), so rare patterns weigh more.
    """

    def __init__(self, train: torch.Tensor, num_entities: int, num_relations: int):
        super().__init__()
        self.num_relations, self.offset = num_relations, num_entities * num_relations
        keys = self.keys(train)
        counts = torch.bincount(keys.flatten(), minlength=2 * self.offset) + 4
        self.register_buffer("counts", counts, persistent=False)

    def keys(self, triples: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` keys of ``(h, r)`` (``h R + r``) and ``(t, r^-1)`` (``E R + t R + r``)."""
        h, r, t = triples.unbind(-1)
        return torch.stack([h * self.num_relations + r, self.offset + t * self.num_relations + r], -1)

    def forward(self, triples: torch.Tensor) -> torch.Tensor:
        """Weights ``[B]`` of ``triples [B, 3]``."""
        counts = self.counts[self.keys(triples)]
        return (counts[:, 0] + counts[:, 1]).float().rsqrt()


# -- NS-KGE: the non-sampling loss over every entity -------------------------------------------
class SquaredScoreSums(abc.ABC):
    """A model's closed form of ``sum_e s(e)^2`` over every entity ``e`` in a query slot, the
    piece of the non-sampling loss that would otherwise enumerate all ``E`` negatives.

    ``s`` is the score the non-sampling loss fits (targets ``target`` for a positive, 0 for
    every other entity); it ranks entities as the model's own score does. The entity-table
    statistics (Gram matrix ``W^T W``, ...) are computed once per call for both slots.
    """

    target: float

    @abc.abstractmethod
    def positive_scores(self, model: nn.Module, positives: torch.Tensor) -> torch.Tensor:
        """``s [B]`` of the positive triples ``[B, 3]``."""

    @abc.abstractmethod
    def all_entity_sums(self, model: nn.Module, positives: torch.Tensor) -> torch.Tensor:
        """``[B]``: ``sum_e s^2`` with every entity ``e`` in the tail slot plus the same in the head slot."""


def entity_table(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Every entity's representation ``W [E, w]`` (through the model's lookup, so gradients
    reach the embedding as everywhere else)."""
    return model.entity_representations(torch.arange(model.num_entities, device=device))


class BilinearSquares(SquaredScoreSums):
    """DistMult, ComplEx (NS-KGE eqs. for bilinear models): the score is linear in the
    candidate, ``s(e) = q . e`` with the model's query vector ``q [B, w]`` (``w = d``, or
    ``2 d`` reals for ComplEx), so ``sum_e s(e)^2 = q^T G q`` with the Gram matrix
    ``G = W^T W [w, w]`` of the entity table ``W [E, w]``: ``O(E w^2)`` once per step
    instead of ``O(B E w)``. Target 1 (NS-KGE code)."""

    target = 1.0

    def positive_scores(self, model, positives):
        return model.score_triples(positives)

    def all_entity_sums(self, model, positives):
        h, r, t = positives.unbind(-1)
        table = entity_table(model, positives.device)
        gram = table.T @ table  # [w, w]
        h_rep, r_rep, t_rep = model.entity_representations(h), model.relation_representations(r), model.entity_representations(t)
        total = positives.new_zeros(len(positives), dtype=table.dtype)
        for head_side in (False, True):
            query = model.query(h_rep, r_rep, t_rep, torch.full((len(positives),), head_side, device=positives.device))
            total = total + ((query @ gram) * query).sum(-1)
        return total


class TranslationSquares(SquaredScoreSums):
    """TransE with its squared distance expanded into inner products (NS-KGE): the fitted
    score is ``s(e) = gamma - ||e - q||^2`` with ``q = h + r`` (tail slot) or ``q = t - r``
    (head slot), i.e. ``s(e) = a - n_e + 2 q . e`` with ``a = gamma - |q|^2 [B]`` and
    ``n_e = |e|^2``. Squared and summed over the table ``W [E, d]``::

        sum_e s^2 = E a^2 + sum_e n_e^2 + 4 q^T G q - 2 a sum_e n_e + 4 a q . m1 - 4 q . m3

    with ``G = W^T W [d, d]``, ``m1 = sum_e e [d]``, ``m3 = sum_e n_e e [d]``. Target
    ``gamma`` (distance 0; NS-KGE's TransE fits ``3 - d^2`` to 3 with unit-norm embeddings),
    negatives are pushed to ``d^2 = gamma``. Ranks as ``gamma - ||h + r - t||_2`` (p = 2 only)."""

    def __init__(self, gamma: float):
        self.target = float(gamma)

    def positive_scores(self, model, positives):
        h, r, t = positives.unbind(-1)
        difference = model.entity_representations(h) + model.relation_representations(r) - model.entity_representations(t)
        return self.target - difference.square().sum(-1)

    def all_entity_sums(self, model, positives):
        h, r, t = positives.unbind(-1)
        table = entity_table(model, positives.device)
        width = table.shape[1]
        # every statistic from ONE Gram product of the augmented table [W | n | 1] ([E, d + 2]):
        # G = W^T W, m3 = W^T n, m1 = W^T 1, sum n^2, sum n, E (one matmul forward and backward)
        augmented = torch.cat([table, table.square().sum(-1, keepdim=True), torch.ones_like(table[:, :1])], 1)
        moments = augmented.T @ augmented  # [d + 2, d + 2]
        gram, m3, m1 = moments[:width, :width], moments[:width, width], moments[:width, width + 1]
        norm_square_sum, norm_sum, count = moments[width, width], moments[width, width + 1], moments[width + 1, width + 1]
        relation, heads, tails = model.relation_representations(r), model.entity_representations(h), model.entity_representations(t)
        total = positives.new_zeros(len(positives), dtype=table.dtype)
        for query in (heads + relation, tails - relation):  # tail slot, head slot: [B, d]
            a = self.target - query.square().sum(-1)  # [B]
            total = total + (
                count * a.square() + norm_square_sum + 4 * ((query @ gram) * query).sum(-1) - 2 * a * norm_sum
                + 4 * a * (query @ m1) - 4 * (query @ m3)
            )
        return total


def squared_score_sums(model: nn.Module) -> SquaredScoreSums:
    """The closed form for ``model``, or a ConfigError naming the models that have one."""
    if isinstance(model, BilinearModel):
        return BilinearSquares()
    if isinstance(model, TransE) and model.p == 2:
        return TranslationSquares(model.gamma)
    detail = "TransE needs train.transe.p: 2 (squared L2 distance)" if isinstance(model, TransE) else f"{type(model).__name__} has none"
    raise ConfigError(f"the NS-KGE non-sampling loss has closed forms for DistMult, ComplEx and TransE only; {detail}")


class NonSamplingLoss(nn.Module):
    """NS-KGE (Li et al., WWW 2021): a weighted square loss over EVERY triple of a query,
    computed without enumerating the negatives.

    For each positive ``(h, r, t)`` and each of its two queries ``(h, r, ?)`` and ``(?, r, t)``
    with candidates ``e`` (the true entity ``e*`` and ``E - 1`` negatives)::

        L_query = c+ (y - s(e*))^2 + c- sum_{e != e*} s(e)^2
                = c- sum_e s(e)^2 + (c+ - c-) s(e*)^2 - 2 c+ y s(e*) + c+ y^2

    ``c+`` = ``positive_weight``, ``c-`` = ``negative_weight``, ``y`` the form's target; the
    all-entity sum comes from :class:`SquaredScoreSums` in ``O(E w^2 + B w^2)``. Row loss =
    tail query + head query; the batch loss is their (optionally weighted) mean. Other TRAIN
    answers of a query count as negatives, as in NS-KGE.
    """

    def __init__(self, form: SquaredScoreSums, positive_weight: float = 1.0, negative_weight: float = 1e-4):
        super().__init__()
        self.form = form
        self.positive_weight, self.negative_weight = float(positive_weight), float(negative_weight)

    def forward(self, model: nn.Module, positives: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        c_pos, c_neg, target = self.positive_weight, self.negative_weight, self.form.target
        score = self.form.positive_scores(model, positives)  # [B]
        all_sums = self.form.all_entity_sums(model, positives)  # [B], both slots
        per_row = c_neg * all_sums + 2 * ((c_pos - c_neg) * score.square() - 2 * c_pos * target * score + c_pos * target**2)
        return batch_mean(per_row, weights)
