"""The contrastive loss of MMRNS (eqs. 9-11).

Shapes: ``B`` rows, ``P`` pre-sampled candidates, ``n`` negatives per row, ``M`` modalities.

Per modality with similarities ``sim [B, P]`` (eq. 8) and weights ``w [B, P]`` (eq. 9)::

    l = -ln( sum_{j in Pos} w_j exp(sim_j / T) / sum_{j in Neg} w_j exp(sim_j / T) )

``Pos`` = the pre-sample candidates that are known TRAIN answers of the row's query (other
than the row's own entity, whose ``cos(z, z)`` is a constant), ``Neg`` = every other
candidate; ``T`` is a temperature (1: the paper's eq. 10, which has none). Rows without a
positive contribute nothing; a modality's loss is the mean over the rows that have one
(``pooled``: one ratio over the whole batch, the released script), and eq. 11 averages the
modalities that contributed.

Eq. 9 weights (``weights``): ``paper``: ``softmax_j(α s_j)`` over the row's ``n`` KGC scores
(detached) for the drawn candidates, ``1/|E|`` for the others; ``script``: the released
script's product ``softmax_j(α s_j) / |E|`` for the drawn candidates (nearly weightless next
to the others' ``1/|E|``).
"""
from __future__ import annotations

import math

import torch

WEIGHTS = ("paper", "script")
_NEVER = -1e9  # log-weight of a candidate outside a set


def contrastive_weights(
    scores: torch.Tensor, positions: torch.Tensor, drawn: torch.Tensor, presample: int, num_entities: int,
    alpha: float, weights: str,
) -> torch.Tensor:
    """Eq. 9 ``ln w [B, P]`` from the drawn negatives' KGC ``scores [B, n]`` at ``positions [B, n]`` (``drawn [B, n]``)."""
    log_weight = torch.full((len(scores), presample), -math.log(num_entities), device=scores.device)
    adversarial = torch.log_softmax(alpha * scores.detach(), dim=1)  # [B, n]
    if weights == "script":
        adversarial = adversarial - math.log(num_entities)
    rows = torch.arange(len(scores), device=scores.device).unsqueeze(1).expand_as(positions)
    log_weight[rows[drawn], positions[drawn]] = adversarial[drawn]
    return log_weight


def contrastive_loss(
    similarities: list[tuple[torch.Tensor, torch.Tensor]], known: torch.Tensor, own: torch.Tensor,
    log_weight: torch.Tensor, temperature: float = 1.0, pooled: bool = False,
) -> torch.Tensor | None:
    """Eqs. 10-11 for ``(sim [B, P], valid [B, P])`` per modality, ``known``/``own [B, P]`` bool, ``ln w [B, P]``.

    None when no row of any modality has both a positive and a negative.
    """
    losses = []
    for sim, valid in similarities:
        positive, negative = known & ~own & valid, ~known & valid
        logit = log_weight + sim / temperature
        if pooled:
            positive, negative, logit = positive.reshape(1, -1), negative.reshape(1, -1), logit.reshape(1, -1)
        usable = positive.any(1) & negative.any(1)  # [rows]
        if not bool(usable.any()):
            continue
        numerator = torch.logsumexp(logit.masked_fill(~positive, _NEVER), dim=1)
        denominator = torch.logsumexp(logit.masked_fill(~negative, _NEVER), dim=1)
        per_row = torch.where(usable, denominator - numerator, torch.zeros_like(numerator))
        losses.append(per_row.sum() / usable.sum())
    return torch.stack(losses).mean() if losses else None
