"""KGC models, looked up by name in :data:`MODELS`."""
from pipeline.models.base import MODELS, KGCModel, Side

__all__ = ["MODELS", "KGCModel", "Side"]
