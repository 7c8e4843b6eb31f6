"""Bernoulli negative sampling (Wang et al. 2014): corrupt the head with ``tph / (tph + hpt)``."""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.samplers.base import SAMPLERS
from pipeline.samplers.uniform import UniformSampler


def head_corruption_probabilities(train: torch.Tensor, num_relations: int) -> torch.Tensor:
    """``p [R]``: ``tph_r / (tph_r + hpt_r)`` from TRAIN; 0.5 for relations absent from TRAIN.

    ``tph_r`` = triples of ``r`` / distinct heads of ``r`` (mean tails per head);
    ``hpt_r`` = triples of ``r`` / distinct tails of ``r`` (mean heads per tail).
    """
    h, r, t = train.unbind(-1)
    triples = torch.bincount(r, minlength=num_relations).double()
    distinct_heads = torch.bincount(torch.unique(torch.stack([r, h], 1), dim=0)[:, 0], minlength=num_relations).double()
    distinct_tails = torch.bincount(torch.unique(torch.stack([r, t], 1), dim=0)[:, 0], minlength=num_relations).double()
    present = triples > 0
    tph = triples / distinct_heads.clamp_min(1)
    hpt = triples / distinct_tails.clamp_min(1)
    return torch.where(present, tph / (tph + hpt).clamp_min(1e-12), torch.full_like(tph, 0.5)).float()


@SAMPLERS.register("bernoulli")
class BernoulliSampler(UniformSampler):
    """Uniform entities, but row ``b`` corrupts its head with probability
    ``tph_r / (tph_r + hpt_r)`` of its relation ``r`` (computed from TRAIN), so 1-to-N
    relations mostly corrupt heads and N-to-1 relations mostly corrupt tails.
    """

    registry_name = "bernoulli"

    def __init__(self, graph: KnowledgeGraph, num_negatives: int, seed: int, exclude_positives: bool = False):
        super().__init__(graph, num_negatives, seed, exclude_positives)
        self.register_buffer("probabilities", head_corruption_probabilities(graph.train, graph.num_relations), persistent=False)

    def head_probability(self, relations: torch.Tensor) -> torch.Tensor:
        return self.probabilities[relations]


#: How a model-aware sampler chooses the corrupted side: ``bernoulli`` (tph / (tph + hpt) of
#: the relation) or ``uniform`` (1/2).
SIDE_CHOICES = ("bernoulli", "uniform")


def side_probabilities(train: torch.Tensor, num_relations: int, choice: str, option: str) -> torch.Tensor:
    """Head-corruption probability ``[R]`` per relation for ``choice`` (one of
    :data:`SIDE_CHOICES`); ``option`` names the params key in the error."""
    if choice not in SIDE_CHOICES:
        raise ConfigError(f"{option} must be one of {', '.join(SIDE_CHOICES)}, got {choice!r}")
    probabilities = head_corruption_probabilities(train, num_relations)
    return probabilities if choice == "bernoulli" else torch.full_like(probabilities, 0.5)
