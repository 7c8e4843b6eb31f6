"""Negative samplers, looked up by name in :data:`SAMPLERS`."""
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives

__all__ = ["SAMPLERS", "NegativeSampler", "Negatives"]
