"""Semantic-matching models: bilinear scores, no margin in the score.

Regularisation (both models): N3 (Lacroix et al. 2018) on the batch's positive triples,
``lambda / B * sum_b (|h_b|_3^3 + |r_b|_3^3 + |t_b|_3^3)``, with ``|x|`` the modulus of each
complex component for ComplEx. The paper's weights (5e-5 on MKG-W/MKG-Y, 1e-5 on DB15K) are
for the RotatE code's form, over the FULL tables every step; that form shrinks every entity
absent from the batch at Adam's full step size (Adam normalises the tiny gradient) and
stalled DistMult at valid MRR 0.13 on MKG-W, so it is not used; params.yaml documents the
weight chosen for this form.
Initialisation: Xavier uniform (PyKEEN).
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import MODELS, KGCModel, Side


def xavier_embedding(count: int, width: int) -> nn.Embedding:
    table = nn.Embedding(count, width, sparse=True)  # see distance.uniform_embedding
    nn.init.xavier_uniform_(table.weight)
    return table


class BilinearModel(KGCModel):
    """Shared storage, N3 regulariser, and scoring through a query vector: the score is
    linear in the candidate's representation, so negatives are one batched product and
    all-entity scoring one matmul. Subclasses give :meth:`interaction` and :meth:`query`."""

    #: Real columns per embedding dimension (2 for complex models).
    components: int = 1

    def __init__(self, num_entities: int, num_relations: int, dim: int, regularization: float):
        super().__init__(num_entities, num_relations)
        self.regularization_weight = float(regularization)
        self.entities = xavier_embedding(num_entities, self.components * dim)
        self.relations = xavier_embedding(num_relations, self.components * dim)

    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.entities(ids)

    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.relations(ids)

    def query(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, head_side: torch.Tensor) -> torch.Tensor:
        """Query vectors ``[B, w]`` such that the score of candidate ``e`` is ``q . e``.

        ``h, r, t [B, w]``; ``head_side [B]`` bool: the candidate replaces the head.
        """
        raise NotImplementedError

    def negative_interaction(
        self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``[B, n]`` as one batched product ``negatives [B, n, w] @ q [B, w, 1]``."""
        return (negatives @ self.query(h, r, t, corrupt_head).unsqueeze(-1)).squeeze(-1)

    def score_all(self, triples: torch.Tensor, side: Side) -> torch.Tensor:
        """Scores ``[B, E]`` as one matmul ``q @ E^T``."""
        h, r, t = triples.unbind(-1)
        head_side = torch.full((len(triples),), side == "head", device=triples.device)
        return self.query(self.entities(h), self.relations(r), self.entities(t), head_side) @ self.entities.weight.T

    def modulus(self, x: torch.Tensor) -> torch.Tensor:
        """Per-component modulus ``[..., dim]`` of representations ``[..., components * dim]``."""
        if self.components == 1:
            return x.abs()
        real, imag = x.chunk(2, dim=-1)
        return torch.sqrt(real.square() + imag.square())

    def regularization(self, triples: torch.Tensor) -> torch.Tensor:
        """``lambda / B * sum_b (|h_b|^3 + |r_b|^3 + |t_b|^3)`` over the batch's positives."""
        h, r, t = triples.unbind(-1)
        cubes = sum(self.modulus(x).pow(3).sum() for x in (self.entities(h), self.relations(r), self.entities(t)))
        return self.regularization_weight * cubes / len(triples)


@MODELS.register("DistMult")
class DistMult(BilinearModel):
    """DistMult (Yang et al. 2015): ``score(h, r, t) = sum_j h_j r_j t_j``, ``h, r, t`` in ``R^dim``.

    Query form: ``(h * r) . t`` (tail side), ``(r * t) . h`` (head side).
    """

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (h * r * t).sum(-1)

    def query(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, head_side: torch.Tensor) -> torch.Tensor:
        """``q [B, d]`` with score ``= q . e`` for candidate ``e``: ``r * t`` (head side) or ``h * r``."""
        return torch.where(head_side.unsqueeze(-1), t, h) * r

@MODELS.register("ComplEx")
class ComplEx(BilinearModel):
    """ComplEx (Trouillon et al. 2016): ``score(h, r, t) = Re(sum_j h_j r_j conj(t_j))``.

    ``h, r, t`` in ``C^dim`` stored as ``[..., 2 dim]`` real (real parts, then imaginary).
    Query form: the score is linear in the candidate's ``[Re e | Im e]``.
    """

    components = 2

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h_re, h_im = h.chunk(2, dim=-1)
        r_re, r_im = r.chunk(2, dim=-1)
        t_re, t_im = t.chunk(2, dim=-1)
        return ((h_re * r_re - h_im * r_im) * t_re + (h_re * r_im + h_im * r_re) * t_im).sum(-1)

    def query(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, head_side: torch.Tensor) -> torch.Tensor:
        """``q [B, 2 dim]`` with score ``= q . [Re e | Im e]`` for candidate ``e``."""
        h_re, h_im = h.chunk(2, dim=-1)
        r_re, r_im = r.chunk(2, dim=-1)
        t_re, t_im = t.chunk(2, dim=-1)
        tail_query = torch.cat([h_re * r_re - h_im * r_im, h_re * r_im + h_im * r_re], dim=-1)  # coefficients of t
        head_query = torch.cat([r_re * t_re + r_im * t_im, r_re * t_im - r_im * t_re], dim=-1)  # coefficients of h
        return torch.where(head_side.unsqueeze(-1), head_query, tail_query)
