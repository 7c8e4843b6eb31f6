"""KGC training losses over positive scores ``[B]`` and negative scores ``[B, n]``.

Scores are "higher is more plausible"; distance models already include their margin
``gamma`` in the score (``gamma - d``), see :mod:`pipeline.models.distance`. Optional
subsampling weights ``[B]`` turn the batch mean into a weighted mean (RotatE code).
"""
from __future__ import annotations

import abc

import torch
from torch import nn
from torch.nn import functional as F

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
