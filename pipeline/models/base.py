"""The interface every KGC model implements: an embedder plus a scoring function.

Scores are "higher is more plausible" for every model. Shapes: ``B`` batch, ``n`` negatives
per positive, ``E`` entities, ``d`` representation width.
"""
from __future__ import annotations

import abc
from typing import Literal

import torch
from torch import nn

from pipeline.registry import Registry

Side = Literal["head", "tail"]


class KGCModel(nn.Module, abc.ABC):
    """Entity/relation representations and an interaction function over them."""

    def __init__(self, num_entities: int, num_relations: int):
        super().__init__()
        self.num_entities = num_entities
        self.num_relations = num_relations

    # -- representations -------------------------------------------------------------
    @abc.abstractmethod
    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        """Entity representations ``[..., d_e]`` for integer ids ``[...]``."""

    @abc.abstractmethod
    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        """Relation representations ``[..., d_r]`` for integer ids ``[...]``."""

    @abc.abstractmethod
    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score ``[...]`` of broadcastable representations ``h [..., d_e]``, ``r [..., d_r]``, ``t [..., d_e]``."""

    # -- scoring ---------------------------------------------------------------------
    def score_triples(self, triples: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` of triples ``[B, 3]`` (head, relation, tail)."""
        h, r, t = triples.unbind(-1)
        return self.interaction(self.entity_representations(h), self.relation_representations(r), self.entity_representations(t))

    def score_negatives(
        self, triples: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``[B, n]`` of corrupted triples.

        ``triples [B, 3]``: the positives. ``negatives``: either entity ids ``[B, n]`` or
        entity representations ``[B, n, d_e]`` (differentiable samples, e.g. MMRNS's
        straight-through Gumbel draws). ``corrupt_head [B]`` bool: row i replaces its head
        (True) or its tail (False) by each negative.
        """
        return self.score_batch(triples, negatives, corrupt_head)[1]

    def score_batch(
        self, triples: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positive [B], negative [B, n])`` scores of one training step in one pass.

        Same arguments as :meth:`score_negatives`. Heads, tails and negative ids are looked
        up in ONE :meth:`entity_representations` call (one embedding gradient per step, the
        training fast path). A model that overrides :meth:`score_triples` or
        :meth:`score_negatives` with its own scoring must override this method as well.
        """
        h, r, t = triples.unbind(-1)
        batch = len(triples)
        if negatives.dtype == torch.long:  # split (not slicing): its backward is one cat, no zero-filled buffers
            h_rep, t_rep, neg = self.entity_representations(torch.cat([h, t, negatives.flatten()])).split([batch, batch, negatives.numel()])
            neg = neg.unflatten(0, negatives.shape)
        else:
            (h_rep, t_rep), neg = self.entity_representations(torch.cat([h, t])).split([batch, batch]), negatives
        r_rep = self.relation_representations(r)
        return self.interaction(h_rep, r_rep, t_rep), self.negative_interaction(h_rep, r_rep, t_rep, neg, corrupt_head)

    def negative_interaction(
        self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor, corrupt_head: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``[B, n]`` from representations ``h, r, t [B, d]`` and ``negatives [B, n, d_e]``.

        Generic: substitute the negatives into the head or tail slot and call
        :meth:`interaction`; models override it with a cheaper form.
        """
        head_side = corrupt_head.view(-1, 1, 1)
        heads = torch.where(head_side, negatives, h.unsqueeze(1))
        tails = torch.where(head_side, t.unsqueeze(1), negatives)
        return self.interaction(heads, r.unsqueeze(1), tails)

    def score_all(self, triples: torch.Tensor, side: Side) -> torch.Tensor:
        """Scores ``[B, E]`` of every entity in the ``side`` slot of ``triples [B, 3]``.

        Generic broadcast, chunked over ``B`` so the ``[b, E, d]`` intermediate stays under
        :attr:`score_all_budget` elements; models override it with a faster closed form
        (matmul) where one exists.
        """
        everything = self.entity_representations(torch.arange(self.num_entities, device=triples.device)).unsqueeze(0)
        width = everything.shape[-1] * (2 if everything.is_complex() else 1)
        chunk = max(1, self.score_all_budget // (self.num_entities * width))
        return torch.cat([self._score_all_broadcast(part, side, everything) for part in triples.split(chunk)])

    #: Upper bound on the elements of one broadcast intermediate in :meth:`score_all`.
    score_all_budget: int = 2**25

    def _score_all_broadcast(self, triples: torch.Tensor, side: Side, everything: torch.Tensor) -> torch.Tensor:
        """Scores ``[b, E]`` of one chunk ``triples [b, 3]`` against ``everything [1, E, d]``."""
        h, r, t = triples.unbind(-1)
        r_rep = self.relation_representations(r).unsqueeze(1)
        if side == "tail":
            return self.interaction(self.entity_representations(h).unsqueeze(1), r_rep, everything)
        return self.interaction(everything, r_rep, self.entity_representations(t).unsqueeze(1))

    def regularization(self, triples: torch.Tensor) -> torch.Tensor:
        """Regularisation term for a batch (0 unless the model defines one)."""
        return triples.new_zeros((), dtype=torch.float32)


MODELS: Registry[KGCModel] = Registry("model")
