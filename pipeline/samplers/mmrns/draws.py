"""Drawing ``n`` negatives per row from the pre-sample (eq. 13).

Shapes: ``B`` rows, ``P`` pre-sampled candidates, ``n`` draws per row.

- :func:`straight_through_draws` (the published sampler): ``n`` masked Gumbel-softmax draws
  without replacement, each with its own noise ``g_k [B, P]``. Draw ``k`` takes
  ``argmax(log p + g_k)`` over the eligible candidates not drawn before, and its relaxation is
  ``y_k = softmax(log p + ln(1e-38)·[drawn before k] + g_k)`` (temperature τ = 1). Vectorised: the ``k``-th
  choice is among the ``n`` best of its own perturbed logits (at most ``k - 1`` of them are
  taken), so one ``topk`` over ``[n, B, P]`` and a loop over ``n`` on ``[B, n]`` give exactly
  the sequential draws; the ``y_k`` come from one softmax over ``[n, B, P]``.
- :func:`gumbel_top_k` (when the draws need no gradient): the ``n`` largest of
  ``log p + g`` with one noise ``g [B, P]``, a sample without replacement from the same
  distribution as ``n`` sequential masked draws (Vieira 2014; Kool et al. 2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.samplers.mmrns.groups import RowGroups, grouped_dots

LOG_MASK = math.log(1e-38)  # eq. 13: log of the mask value at known positives and drawn columns


@dataclass
class Draws:
    """Where each of a row's ``n`` negatives sits in the pre-sample."""

    positions: torch.Tensor  # [B, n] column in the pre-sample (0 where not drawn)
    drawn: torch.Tensor  # [B, n] bool: drawn from the pre-sample (False: the row ran out of eligible candidates)
    soft: torch.Tensor | None = None  # [B, n, P] straight-through relaxations y_k, or None


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise ``-ln(-ln U)`` drawn on the CPU generator (same numbers on every device)."""
    noise = torch.rand(shape, generator=generator).to(device)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_().neg_().log_().neg_()  # in place: one [n, B, P] buffer


def straight_through_draws(logits: torch.Tensor, eligible: torch.Tensor, noise: torch.Tensor) -> Draws:
    """Sequential masked Gumbel draws for ``logits [B, P]`` (log p + log mask), ``eligible [B, P]``
    and ``noise [n, B, P]`` (overwritten), with their relaxations ``soft [B, n, P]`` (differentiable in ``logits``)."""
    n, batch, _ = noise.shape
    perturbed = noise.add_(logits.detach())  # [n, B, P], in place: the noise is not needed on its own
    values, best = perturbed.masked_fill(~eligible, -math.inf).topk(n, dim=-1)  # [n, B, n]
    positions = torch.zeros(batch, n, dtype=torch.long, device=logits.device)
    drawn = torch.zeros(batch, n, dtype=torch.bool, device=logits.device)
    for k in range(n):
        taken = (best[k].unsqueeze(-1) == positions[:, :k].masked_fill(~drawn[:, :k], -1).unsqueeze(1)).any(-1)
        free = (values[k] > -math.inf) & ~taken  # [B, n]
        first = free.to(torch.uint8).argmax(-1, keepdim=True)  # first free one among the n best
        drawn[:, k] = free.any(-1)
        positions[:, k] = torch.where(drawn[:, k], best[k].gather(-1, first).squeeze(-1), 0)
    scores = perturbed + (logits - logits.detach())  # [n, B, P]: log p + log mask + g_k, differentiable in logits
    earlier, later = torch.triu_indices(n, n, offset=1, device=logits.device)  # every pair of draws j < k
    rows = torch.arange(batch, device=logits.device).expand(len(later), -1)  # [pairs, B]
    mask = (LOG_MASK * drawn[:, earlier].T).to(scores.dtype)  # ln(1e-38) at draw j's column for the later draw k
    scores.index_put_((later.unsqueeze(1).expand_as(rows), rows, positions[:, earlier].T), mask, accumulate=True)
    soft = torch.softmax(scores, dim=-1).permute(1, 0, 2)  # [B, n, P]
    return Draws(positions, drawn, soft)


def gumbel_top_k(logits: torch.Tensor, eligible: torch.Tensor, n: int, generator: torch.Generator) -> Draws:
    """``n`` draws without replacement from ``softmax(logits [B, P])`` over the eligible candidates."""
    perturbed = logits.detach() + gumbel_noise(tuple(logits.shape), generator, logits.device)
    values, positions = perturbed.masked_fill_(~eligible, -math.inf).topk(n, dim=-1)  # [B, n]
    drawn = values > -math.inf
    return Draws(positions.masked_fill(~drawn, 0), drawn)


class StraightThroughSelect(torch.autograd.Function):
    """``(hard + soft - soft.detach()) @ candidates`` per row, ``hard = one_hot(index)``, as a gather.

    ``table [Q, W, d]`` holds the candidates of ``Q`` pre-samples (``Q = 1``: one shared by the
    batch); ``draws`` groups the ``B n`` draws (row-major) by the pre-sample they use.
    Forward: ``table[pre-sample, index]`` ``[B, n, d]`` exactly. Backward: ``soft [B, n, W]``
    gets ``sign · <grad, candidate>`` (``sign = -1`` reverses the gradient: the sampler then
    ascends the loss it feeds); ``table`` gets the one-hot scatter of ``grad``.
    """

    @staticmethod
    def forward(
        ctx: Any, soft: torch.Tensor, index: torch.Tensor, table: torch.Tensor, draws: RowGroups, sign: float = 1.0
    ) -> torch.Tensor:
        ctx.save_for_backward(index, table)
        ctx.draws, ctx.sign = draws, sign
        return table[draws.group.view(index.shape), index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None]:
        index, table = ctx.saved_tensors
        draws: RowGroups = ctx.draws
        grad_soft = None
        if ctx.needs_input_grad[0]:
            grad_soft = grouped_dots(table, grad.reshape(-1, grad.shape[-1]), draws).view(*index.shape, -1)
            if ctx.sign != 1.0:
                grad_soft = grad_soft.mul_(ctx.sign)
        grad_table = None
        if ctx.needs_input_grad[2]:
            grad_table = torch.zeros_like(table).index_put_((draws.group.view(index.shape), index), grad, accumulate=True)
        return grad_soft, None, grad_table, None, None
