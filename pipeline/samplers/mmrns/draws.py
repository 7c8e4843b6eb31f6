"""Drawing ``n`` negatives per row from the pre-sample (eq. 13).

Shapes: ``B`` rows, ``P`` pre-sampled candidates (``W``: a row's padded pool width), ``n``
draws per row, ``d`` the model's representation width.

- :func:`straight_through_sample` (the published sampler): ``n`` masked Gumbel-softmax draws
  without replacement, each with its own noise ``g_k [B, P]``. Draw ``k`` takes
  ``argmax(log p + g_k)`` over the eligible candidates not drawn before, and its relaxation is
  ``y_k = softmax(log p + ln(1e-38)·[drawn before k] + g_k)`` (temperature τ = 1); the row gets
  ``(one_hot_k + y_k - y_k.detach()) @ candidates``. Vectorised: the ``k``-th choice is among
  the ``n`` best of its own perturbed logits (at most ``k - 1`` of them are taken), so a
  ``topk`` per draw and a loop over ``n`` on ``[B, n]`` give exactly the sequential draws.
  Fused: forward is the gather of the drawn candidates; backward recomputes each ``y_k``
  ``[B, P]`` from the kept perturbed logits and meets it with its own gradient there, so no
  ``[n, B, P]`` relaxation, softmax or gradient tensor is built.
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


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise ``-ln(-ln U)`` drawn on the CPU generator (same numbers on every device)."""
    noise = torch.rand(shape, generator=generator).to(device)
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_().neg_().log_().neg_()  # in place: one [n, B, P] buffer


def straight_through_sample(
    logits: torch.Tensor, eligible: torch.Tensor, noise: torch.Tensor, table: torch.Tensor, rows: RowGroups, sign: float = 1.0,
) -> tuple[torch.Tensor, Draws]:
    """Sequential masked Gumbel draws for ``logits [B, W]`` (log p + log mask), ``eligible [B, W]``
    and ``noise [n, B, W]`` (overwritten), and the drawn candidates' representations ``[B, n, d]``
    with the straight-through gradient (module docstring). ``table [Q, W, d]`` holds the
    candidates of ``Q`` pre-samples (``Q = 1``: one shared by the batch) and ``rows`` groups the
    rows by the pre-sample they draw from. Forward: ``table[pre-sample, position]`` exactly.
    Backward: ``logits`` get ``sign · sum_k J_softmax(y_k)ᵀ <grad_k, candidates>`` (``sign = -1``
    reverses it: the sampler then ascends the loss it feeds), ``table`` the scatter of ``grad``."""
    perturbed = noise.add_(logits.detach())  # [n, B, W], in place: the noise is not needed on its own
    positions, drawn = _sequential_choices(perturbed, eligible)
    representations = _StraightThroughSample.apply(logits, table, perturbed, positions, drawn, rows, sign)
    return representations, Draws(positions, drawn)


def _sequential_choices(perturbed: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, drawn)`` ``[B, n]`` of the sequential draws from ``perturbed [n, B, W]``."""
    n, batch, _ = perturbed.shape
    best = perturbed.new_empty(n, batch, n, dtype=torch.long)
    found = perturbed.new_empty(n, batch, n, dtype=torch.bool)
    for k in range(n):  # one [B, W] masked copy at a time
        values, best[k] = perturbed[k].masked_fill(~eligible, -math.inf).topk(n, dim=-1)
        found[k] = values > -math.inf
    positions = torch.zeros(batch, n, dtype=torch.long, device=perturbed.device)
    drawn = torch.zeros(batch, n, dtype=torch.bool, device=perturbed.device)
    for k in range(n):
        taken = (best[k].unsqueeze(-1) == positions[:, :k].masked_fill(~drawn[:, :k], -1).unsqueeze(1)).any(-1)
        free = found[k] & ~taken  # [B, n]
        first = free.to(torch.uint8).argmax(-1, keepdim=True)  # first free one among the n best
        drawn[:, k] = free.any(-1)
        positions[:, k] = torch.where(drawn[:, k], best[k].gather(-1, first).squeeze(-1), 0)
    return positions, drawn


class _StraightThroughSample(torch.autograd.Function):
    """Forward and backward of :func:`straight_through_sample` after the choices; keeps the
    perturbed logits ``[n, B, W]`` (the noise buffer) and recomputes ``y_k`` draw by draw."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, table: torch.Tensor, perturbed: torch.Tensor, positions: torch.Tensor,
        drawn: torch.Tensor, rows: RowGroups, sign: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(table, perturbed, positions, drawn)
        ctx.rows, ctx.sign = rows, sign
        return table[rows.group.unsqueeze(1), positions]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        table, perturbed, positions, drawn = ctx.saved_tensors
        rows: RowGroups = ctx.rows
        grad_logits = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.zeros_like(perturbed[0])  # [B, W]
            earlier = torch.zeros_like(grad_logits)  # ln(1e-38) at the columns of the draws before k
            everyone = torch.arange(len(positions), device=positions.device)
            n = perturbed.shape[0]
            if len(table) == 1:  # shared pre-sample: one [B, d] x [d, P] product per draw, no [B, n, P] tensor
                per_draw = None
            else:  # pools (narrow W): every draw in one padded bmm per chunk of groups
                width = rows.chunks[0].last - rows.chunks[0].first
                by_draw = RowGroups.build(rows.group.repeat_interleave(n), rows.num_groups, width)
                per_draw = grouped_dots(table, grad.reshape(-1, grad.shape[-1]), by_draw).view(len(positions), n, -1)  # [B, n, W]
            for k in range(n):
                relaxed = torch.softmax(perturbed[k] + earlier, dim=-1)  # y_k [B, W]
                grad_relaxed = (grad[:, k] @ table[0].T if per_draw is None else per_draw[:, k]) * ctx.sign  # [B, W]
                grad_relaxed -= (relaxed * grad_relaxed).sum(-1, keepdim=True)
                grad_logits.addcmul_(relaxed, grad_relaxed)
                earlier.index_put_((everyone, positions[:, k]), LOG_MASK * drawn[:, k].to(earlier.dtype), accumulate=True)
        if ctx.needs_input_grad[1]:
            grad_table = torch.zeros_like(table).index_put_((rows.group.unsqueeze(1).expand_as(positions), positions), grad, accumulate=True)
        return grad_logits, grad_table, None, None, None, None, None


def gumbel_top_k(logits: torch.Tensor, eligible: torch.Tensor, n: int, generator: torch.Generator) -> Draws:
    """``n`` draws without replacement from ``softmax(logits [B, P])`` over the eligible candidates."""
    perturbed = logits.detach() + gumbel_noise(tuple(logits.shape), generator, logits.device)
    values, positions = perturbed.masked_fill_(~eligible, -math.inf).topk(n, dim=-1)  # [B, n]
    drawn = values > -math.inf
    return Draws(positions.masked_fill(~drawn, 0), drawn)
