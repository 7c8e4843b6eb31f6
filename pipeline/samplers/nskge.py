"""NS-KGE (Li et al., "Efficient Non-Sampling Knowledge Graph Embedding", WWW 2021): no
sampling at all; every entity is a negative, weighted, in a square loss whose sum over the
``E`` entities has a closed form.

Per positive ``(h, r, t)`` and each query ``(h, r, ?)``, ``(?, r, t)``, with ``s`` the fitted
score, ``y`` its target, ``c+``/``c-`` the positive/negative weights::

    L = c+ (y - s(e*))^2 + c- sum_{e != e*} s(e)^2
      = c- sum_e s(e)^2 + (c+ - c-) s(e*)^2 - 2 c+ y s(e*) + c+ y^2

``sum_e s(e)^2`` is never enumerated (no ``[B, E]`` tensor): for DistMult/ComplEx
``s(e) = q . e`` gives ``q^T (W^T W) q`` (``W [E, w]`` the entity table, ``q [B, w]``); for
TransE the squared distance ``||e - q||^2`` is expanded into inner products
(:class:`pipeline.losses.TranslationSquares`). Cost per step ``O(E w^2 + B w^2)``. Other models
(RotatE, PairRE, GC-OTE, TransE with p = 1) have no such form: building the sampler for them
raises a ConfigError.

The loss lives in :mod:`pipeline.losses` (:class:`~pipeline.losses.NonSamplingLoss`); this
module is the sampler-side switch: ``sampler.name: ns-kge`` selects it as Table 2's rows do,
and ``draws_negatives = False`` tells :func:`pipeline.training.step_loss` to use
:meth:`whole_graph_loss` (plus the model's regulariser) instead of sample + ``train.loss``.
``train.loss``, ``train.num_negatives`` and ``train.self_adversarial`` are therefore unused.
Defaults ``c+ = 1``, ``c- = 1e-4`` are those of the NS-KGE example scripts.
"""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.losses import NonSamplingLoss, squared_score_sums
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives


@SAMPLERS.register("ns-kge")
class NonSamplingSampler(NegativeSampler):
    """Draws nothing; trains with the NS-KGE loss over all entities (see the module docstring)."""

    draws_negatives = False

    def __init__(
        self,
        graph: KnowledgeGraph,
        num_negatives: int,
        seed: int,
        model: KGCModel,
        positive_weight: float = 1.0,
        negative_weight: float = 1e-4,
    ):
        super().__init__(graph, num_negatives, seed)
        for name, value in (("positive_weight", positive_weight), ("negative_weight", negative_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"sampler.ns-kge.{name} must be a positive number, got {value!r}")
        # The model is not stored (its parameters belong to the KGC optimizer group); only its form.
        self.loss = NonSamplingLoss(squared_score_sums(model), positive_weight, negative_weight)

    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        """No negatives: ``ids [B, 0]`` (the loss covers every entity)."""
        empty = torch.empty((len(positives), 0), dtype=torch.long, device=positives.device)
        return Negatives(ids=empty, corrupt_head=torch.zeros(len(positives), dtype=torch.bool, device=positives.device))

    def whole_graph_loss(self, positives: torch.Tensor, model: KGCModel, weights: torch.Tensor | None) -> torch.Tensor:
        return self.loss(model, positives, weights)
