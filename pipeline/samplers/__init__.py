"""Negative samplers, looked up by name in :data:`SAMPLERS`."""
from __future__ import annotations

import inspect
from typing import Any

from pipeline.errors import ConfigError
from pipeline.features import Features
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers import bernoulli, kbgan, mmrns, nscaching, nskge, sans, uniform  # noqa: F401,E402  (each import registers its sampler)

__all__ = ["SAMPLERS", "NegativeSampler", "Negatives", "build_sampler"]


def build_sampler(
    name: str,
    options: dict[str, Any],
    graph: KnowledgeGraph,
    model: KGCModel,
    num_negatives: int,
    seed: int,
    text: Features | None = None,
    visual: Features | None = None,
) -> NegativeSampler:
    """The sampler ``name`` with its params.yaml ``options``; model-aware samplers (a
    ``from_params`` factory, e.g. MMRNS) also get the model and the feature caches, and a
    sampler whose ``__init__`` takes ``model`` (NS-KGE) gets the KGC model."""
    sampler_class = SAMPLERS.get(name)
    if hasattr(sampler_class, "from_params"):
        return sampler_class.from_params(graph, options, model, num_negatives, seed, text, visual)
    if "model" in options:
        raise ConfigError(f"sampler.{name}.model: not an option (the KGC model is train.model)")
    needs_model = "model" in inspect.signature(sampler_class.__init__).parameters  # KGC-model-aware (NS-KGE)
    try:
        return sampler_class(graph, num_negatives, seed, **options, **({"model": model} if needs_model else {}))
    except TypeError as error:
        raise ConfigError(f"sampler.{name}: {error}") from None
