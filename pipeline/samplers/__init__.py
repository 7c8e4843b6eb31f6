"""Negative samplers, looked up by name in :data:`SAMPLERS`."""
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers import bernoulli, mmrns, uniform  # noqa: F401,E402  (each import registers its sampler)

__all__ = ["SAMPLERS", "NegativeSampler", "Negatives"]
