"""The interface every negative sampler implements.

The training loop calls, per step::

    negatives = sampler.sample(positives, model, step)          # Negatives
    scores = model.score_negatives(positives, negatives.as_model_input(), negatives.corrupt_head)
    loss = kgc_loss(...) + sampler.auxiliary_loss(positives, negatives, scores, model)

so model-aware samplers (MMRNS, NSCaching, KBGAN) fit without changing the loop. A sampler
is an ``nn.Module``: its trainable parameters go into the optimizer (their own parameter
group) and its state, including its random generator, into checkpoints.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.registry import Registry


@dataclass
class Negatives:
    """Negatives for a batch of ``B`` positives, ``n`` each."""

    ids: torch.Tensor  # [B, n] int64 entity ids
    corrupt_head: torch.Tensor  # [B] bool: True replaces the head, False the tail
    representations: torch.Tensor | None = None  # [B, n, d_e] differentiable samples, or None

    def as_model_input(self) -> torch.Tensor:
        """What :meth:`KGCModel.score_negatives` takes: representations if any, else ids."""
        return self.ids if self.representations is None else self.representations


class NegativeSampler(nn.Module, abc.ABC):
    """Draws ``num_negatives`` corruptions per positive triple from its own seeded generator."""

    def __init__(self, graph: KnowledgeGraph, num_negatives: int, seed: int):
        super().__init__()
        self.num_entities = graph.num_entities
        self.num_negatives = num_negatives
        self.generator = torch.Generator().manual_seed(seed)

    #: False for a sampler whose loss covers every entity without drawing negatives (NS-KGE):
    #: the training step calls :meth:`whole_graph_loss` instead of sample + KGC loss + auxiliary loss.
    draws_negatives: bool = True

    @abc.abstractmethod
    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        """Negatives for ``positives [B, 3]`` at training step ``step`` (0-based)."""

    def auxiliary_loss(
        self, positives: torch.Tensor, negatives: Negatives, negative_scores: torch.Tensor, model: KGCModel
    ) -> torch.Tensor | None:
        """An extra loss term the sampler trains with (``negative_scores [B, n]``), or None."""
        return None

    def whole_graph_loss(self, positives: torch.Tensor, model: KGCModel, weights: torch.Tensor | None) -> torch.Tensor:
        """The training loss of ``positives [B, 3]`` against every entity (samplers with
        ``draws_negatives`` False); ``weights [B]`` optional row weights."""
        raise NotImplementedError(f"{type(self).__name__} draws negatives; it has no whole-graph loss")

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


SAMPLERS: Registry[NegativeSampler] = Registry("sampler")
