"""Uniform negative sampling: replace the head or the tail (50/50) by a uniform entity."""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers.known_positives import KnownPositives

#: Redraw rounds for negatives that hit a known TRAIN triple; survivors of the last round stay
#: (a draw whose query has a fraction q of known answers survives with probability q^100).
MAX_REDRAW_ROUNDS = 100


@SAMPLERS.register("uniform")
class UniformSampler(NegativeSampler):
    """Row ``b`` corrupts its head with probability :meth:`head_probability` (1/2 here),
    else its tail, by ``n`` entities drawn uniformly with replacement.

    ``exclude_positives``: a draw that forms a known TRAIN triple is redrawn (all such
    draws at once, up to ``MAX_REDRAW_ROUNDS`` rounds; vectorised, no loop over rows).
    All draws come from the sampler's seeded CPU generator and are then moved to the
    positives' device (where the sampler's buffers must live too), so results are
    reproducible on any device.
    """

    registry_name = "uniform"

    def __init__(self, graph: KnowledgeGraph, num_negatives: int, seed: int, exclude_positives: bool = False):
        super().__init__(graph, num_negatives, seed)
        if not isinstance(exclude_positives, bool):
            raise ConfigError(f"sampler.{self.registry_name}.exclude_positives must be true or false, got {exclude_positives!r}")
        self.known = KnownPositives(graph.train, graph.num_entities, graph.num_relations) if exclude_positives else None

    def head_probability(self, relations: torch.Tensor) -> torch.Tensor:
        """Probability ``[B]`` that each row corrupts its head."""
        return torch.full(relations.shape, 0.5, device=relations.device)

    def draw(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform entity ids from the CPU generator, moved to ``device``."""
        return torch.randint(self.num_entities, shape, generator=self.generator).to(device)

    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        batch, device = len(positives), positives.device
        coins = torch.rand(batch, generator=self.generator).to(device)
        corrupt_head = coins < self.head_probability(positives[:, 1])
        ids = self.draw((batch, self.num_negatives), device)
        if self.known is not None:
            for _ in range(MAX_REDRAW_ROUNDS):
                known = self.known.corruptions_known(positives, ids, corrupt_head)
                count = int(known.sum())
                if count == 0:
                    break
                ids[known] = self.draw((count,), device)
        return Negatives(ids=ids, corrupt_head=corrupt_head)
