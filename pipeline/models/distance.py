"""Distance models: the score is ``gamma - distance``, so higher is more plausible.

Convention shared by every model here: the margin ``gamma`` lives in the score, as in the
RotatE code base. The negative-sampling loss is then ``-log sigmoid(s_pos) - sum_i w_i log
sigmoid(-s_neg_i)`` (equal to ``-log sigmoid(gamma - d_pos) - ...`` in distance form) and
rankings do not depend on ``gamma``. Embeddings start uniform in ``[-a, a]`` with
``a = (gamma + 2) / dim`` (RotatE code).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.base import MODELS, KGCModel, Side


def embedding_range(gamma: float, dim: int) -> float:
    """Half-width ``(gamma + 2) / dim`` of the uniform initialisation (RotatE code)."""
    return (gamma + 2.0) / dim


def uniform_embedding(count: int, width: int, bound: float) -> nn.Embedding:
    """An ``nn.Embedding [count, width]`` initialised uniform in ``[-bound, bound]``.

    Sparse gradients: a step touches a few thousand rows, and the training loop densifies
    the (summed) sparse gradient once before Adam, instead of one dense ``[count, width]``
    gradient per lookup.
    """
    table = nn.Embedding(count, width, sparse=True)
    nn.init.uniform_(table.weight, -bound, bound)
    return table


class AnchoredL2Distance(torch.autograd.Function):
    """``dist_bi = ||r_b + s_b (x_bi - x_b0)||_2 [B, m]`` for ``x [B, m + 1, d]`` (column 0 the
    anchor entity), ``r [B, d]``, ``s [B]`` (+-1): TransE's ``||h + r - t||`` of ``m``
    candidates, with ``s = +1`` for candidate heads (anchor ``t``) and ``-1`` for candidate
    tails (anchor ``h``).

    The training hot path with a hand-written backward: one ``[B, m, d]`` tensor is written
    forward (the differences) and one ``[B, m + 1, d]`` backward (the gradient of ``x``, which
    comes from ONE embedding lookup). With ``u_bi = diff_bi g_bi / dist_bi``:
    ``dL/dx_bi = s_b u_bi``, ``dL/dx_b0 = -s_b sum_i u_bi``, ``dL/dr_b = sum_i u_bi``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        offset = torch.addcmul(r, sign.unsqueeze(1), x[:, 0], value=-1).unsqueeze(1)  # r - s x_0: [B, 1, d]
        diff = torch.addcmul(offset, sign.view(-1, 1, 1), x[:, 1:])  # [B, m, d]
        distance = torch.linalg.vector_norm(diff, dim=-1)
        ctx.save_for_backward(diff, distance, sign)
        return distance

    @staticmethod
    def backward(ctx, grad_distance: torch.Tensor):
        diff, distance, sign = ctx.saved_tensors
        scale = grad_distance / distance.clamp_min(torch.finfo(distance.dtype).tiny)  # [B, m]; diff = 0 there
        grad_r = (scale.unsqueeze(1) @ diff).squeeze(1)  # sum_i u_bi: [B, d]
        grad_x = diff.new_empty(diff.shape[0], diff.shape[1] + 1, diff.shape[2])
        torch.mul(diff, (scale * sign.unsqueeze(1)).unsqueeze(-1), out=grad_x[:, 1:])
        torch.mul(grad_r, -sign.unsqueeze(1), out=grad_x[:, 0])
        return grad_x, grad_r if ctx.needs_input_grad[1] else None, None


@MODELS.register("TransE")
class TransE(KGCModel):
    """TransE (Bordes et al. 2013): ``score(h, r, t) = gamma - ||h + r - t||_p``.

    ``h, r, t`` in ``R^dim``; ``p`` is 1 or 2. The default ``p = 2`` is chosen for the speed
    of all-entity scoring (a matmul: ``||q - e||^2 = |q|^2 + |e|^2 - 2 q.e``, clamped at 0,
    with ``q = h + r`` for tail queries and ``q = t - r`` for head queries); ``p = 1`` (the
    RotatE code's TransE) scores all entities with :func:`torch.cdist`.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, gamma: float, p: int = 2):
        super().__init__(num_entities, num_relations)
        if p not in (1, 2):
            raise ConfigError(f"train.transe.p must be 1 or 2, got {p!r}")
        self.gamma, self.p = float(gamma), p
        bound = embedding_range(gamma, dim)
        self.entities = uniform_embedding(num_entities, dim, bound)
        self.relations = uniform_embedding(num_relations, dim, bound)

    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.entities(ids)

    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.relations(ids)

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.gamma - self.norm(h + r - t)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """``||x||_p`` over the last dim. ``p = 2`` as ``sqrt(sum x^2)``: its backward needs no
        zero-masking pass (``vector_norm``'s does); ``x = 0`` exactly has no finite gradient."""
        return x.square().sum(-1).sqrt() if self.p == 2 else x.abs().sum(-1)

    def score_batch(self, triples: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive is candidate 0 of its row: ``(anchor, true entity, negatives)`` come
        from one ``[B, n + 2]`` lookup scored by :class:`AnchoredL2Distance` (``p = 2``)."""
        if self.p != 2 or negatives.dtype != torch.long:
            return super().score_batch(triples, negatives, corrupt_head)
        h, r, t = triples.unbind(-1)
        side = corrupt_head.unsqueeze(1)
        ids = torch.cat([torch.where(side, t.unsqueeze(1), h.unsqueeze(1)), torch.where(side, h.unsqueeze(1), t.unsqueeze(1)), negatives], 1)
        sign = corrupt_head.to(self.entities.weight.dtype).mul(2).sub(1)
        distance = AnchoredL2Distance.apply(self.entities(ids), self.relations(r), sign)  # [B, n + 1]
        return self.gamma - distance[:, 0], self.gamma - distance[:, 1:]

    def negative_interaction(
        self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``[B, n]``: a head corruption is ``||neg + r - t||``, a tail one ``||h + r - neg||``."""
        side = corrupt_head.view(-1, 1, 1)
        if self.p == 2:
            anchor = torch.where(side, t.unsqueeze(1), h.unsqueeze(1))
            sign = corrupt_head.to(negatives.dtype).mul(2).sub(1)
            return self.gamma - AnchoredL2Distance.apply(torch.cat([anchor, negatives], 1), r, sign)
        return self.interaction(torch.where(side, negatives, h.unsqueeze(1)), r.unsqueeze(1), torch.where(side, t.unsqueeze(1), negatives))

    def score_all(self, triples: torch.Tensor, side: Side) -> torch.Tensor:
        h, r, t = triples.unbind(-1)
        r_rep = self.relations(r)
        query = self.entities(h) + r_rep if side == "tail" else self.entities(t) - r_rep  # [B, d]
        everything = self.entities.weight  # [E, d]
        if self.p == 1:
            return self.gamma - torch.cdist(query, everything, p=1.0)
        squared = (query.square().sum(-1, keepdim=True) + everything.square().sum(-1)).addmm_(query, everything.T, alpha=-2)
        return self.gamma - squared.clamp_min_(0).sqrt_()


@MODELS.register("RotatE")
class RotatE(KGCModel):
    """RotatE (Sun et al. 2019): ``score = gamma - sum_j |h_j * exp(i theta_rj) - t_j|``.

    ``h, t`` in ``C^dim`` stored as ``[..., 2 dim]`` real (real parts, then imaginary
    parts); the relation is a phase vector ``theta_r = r / (a / pi)`` from ``r`` in
    ``R^dim`` (``a`` the initialisation range). Head queries use the inverse rotation:
    ``|h - t * exp(-i theta)|`` equals the same modulus.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, gamma: float):
        super().__init__(num_entities, num_relations)
        self.gamma = float(gamma)
        self.phase_scale = math.pi / embedding_range(gamma, dim)
        self.entities = uniform_embedding(num_entities, 2 * dim, embedding_range(gamma, dim))
        self.relations = uniform_embedding(num_relations, dim, embedding_range(gamma, dim))

    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.entities(ids)

    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.relations(ids)

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.gamma - self.modulus_distance(self.rotate(h, r, inverse=False), t)

    def rotate(self, x: torch.Tensor, r: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``x * exp(i theta_r)`` (or ``exp(-i theta_r)``) as ``[..., 2 dim]`` real."""
        x_re, x_im = x.chunk(2, dim=-1)
        phase = r * self.phase_scale
        cos, sin = phase.cos(), phase.sin()
        if inverse:
            sin = -sin
        return torch.cat([x_re * cos - x_im * sin, x_re * sin + x_im * cos], dim=-1)

    @staticmethod
    def modulus_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_j |x_j - y_j|`` over complex components (``[..., 2 dim]`` real)."""
        diff_re, diff_im = (x - y).chunk(2, dim=-1)
        return torch.sqrt(diff_re.square() + diff_im.square()).sum(-1)

    def query(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, head_side: torch.Tensor) -> torch.Tensor:
        """``q [B, 2 dim]`` with score ``gamma - sum_j |q_j - e_j|`` for candidate ``e``:
        ``h * exp(i theta)`` (tail side) or ``t * exp(-i theta)`` (head side; the rotation is
        unitary, so ``|e exp(i theta) - t| = |e - t exp(-i theta)|``)."""
        return torch.where(head_side.unsqueeze(-1), self.rotate(t, r, inverse=True), self.rotate(h, r, inverse=False))

    def negative_interaction(
        self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor
    ) -> torch.Tensor:
        return self.gamma - self.modulus_distance(self.query(h, r, t, corrupt_head).unsqueeze(1), negatives)

    def score_all(self, triples: torch.Tensor, side: Side) -> torch.Tensor:
        """Query form, chunked so the ``[b, E, 2 dim]`` difference stays bounded."""
        h, r, t = triples.unbind(-1)
        head_side = torch.full((len(triples),), side == "head", device=triples.device)
        query = self.query(self.entities(h), self.relations(r), self.entities(t), head_side)
        everything = self.entities.weight
        chunk = max(1, self.score_all_budget // everything.numel())
        return torch.cat([self.gamma - self.modulus_distance(part.unsqueeze(1), everything) for part in query.split(chunk)])


@MODELS.register("PairRE")
class PairRE(KGCModel):
    """PairRE (Chao et al. 2021): ``score = gamma - || h/|h| * r_h - t/|t| * r_t ||_1``.

    ``h, t`` in ``R^dim`` (L2-normalised inside the score, as in the PairRE code); the
    relation is the pair ``(r_h, r_t)`` stored as ``[..., 2 dim]``.
    """

    def __init__(self, num_entities: int, num_relations: int, dim: int, gamma: float):
        super().__init__(num_entities, num_relations)
        self.gamma = float(gamma)
        self.entities = uniform_embedding(num_entities, dim, embedding_range(gamma, dim))
        self.relations = uniform_embedding(num_relations, 2 * dim, embedding_range(gamma, dim))

    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.entities(ids)

    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.relations(ids)

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r_head, r_tail = r.chunk(2, dim=-1)
        h = nn.functional.normalize(h, dim=-1)
        t = nn.functional.normalize(t, dim=-1)
        return self.gamma - (h * r_head - t * r_tail).abs().sum(-1)
