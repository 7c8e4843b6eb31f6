"""Per-entity visual (BEiT) and textual (SBERT) features, cached per modality.

The sampler reads a modality with :func:`load_features` (see :mod:`pipeline.features.cache`
for the directory layout).
"""
from pipeline.features.cache import Features, load_features

__all__ = ["Features", "load_features"]
