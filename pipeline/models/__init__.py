"""KGC models, looked up by name in :data:`MODELS`.

Every model takes ``(num_entities, num_relations, dim, ...)`` plus the subset of the
shared hyper-parameters it uses (``gamma`` for distance models, ``regularization`` for
DistMult/ComplEx, ``train_triples`` for GC-OTE's graph context) and its own options.
"""
from __future__ import annotations

import inspect
from typing import Any

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models import distance, gcote, semantic  # noqa: F401  (registers the models)
from pipeline.models.base import MODELS, KGCModel, Side

__all__ = ["MODELS", "KGCModel", "Side", "build_model", "uses"]

SHARED_KEYS = ("dim", "gamma", "regularization")


def uses(name: str, key: str) -> bool:
    """Whether model ``name`` takes the shared hyper-parameter ``key`` (one of :data:`SHARED_KEYS`)."""
    return key in inspect.signature(MODELS.get(name).__init__).parameters


def build_model(name: str, graph: KnowledgeGraph, shared: dict[str, Any], options: dict[str, Any] | None = None) -> KGCModel:
    """Instantiate model ``name`` for ``graph``.

    ``shared``: ``dim``, ``gamma``, ``regularization`` (each model takes those it uses);
    ``options``: the model's own keyword arguments (``train.<model name>`` in params.yaml),
    an unknown key is a :class:`ConfigError` naming it.
    """
    cls = MODELS.get(name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: shared[key] for key in SHARED_KEYS if key in accepted}
    if "train_triples" in accepted:
        kwargs["train_triples"] = graph.train
    for key, value in (options or {}).items():
        if key not in accepted or key in kwargs or key in ("num_entities", "num_relations"):
            raise ConfigError(f"train.{name.lower()}.{key} is not an option of {cls.__name__}")
        kwargs[key] = value
    return cls(graph.num_entities, graph.num_relations, **kwargs)
