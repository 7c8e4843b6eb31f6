"""Read the feature stages' inputs: the entity count and the align stage's media table."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.errors import DataError
from pipeline.media import MEDIA_COLUMNS
from pipeline.tables import read_table


def count_entities(entities_file: str | Path) -> int:
    """Number of entities ``E`` of a canonical ``entities.parquet`` (ids 0..E-1)."""
    ids = read_table(entities_file, ["id"], "download")["id"]
    if not ids.sort_values().reset_index(drop=True).equals(pd.Series(range(len(ids)), dtype=ids.dtype)):
        raise DataError(entities_file, "column 'id' is not 0..E-1")
    return len(ids)


@dataclass(frozen=True)
class EntityMedia:
    """Per-entity inputs, indexed by entity id ``0..E-1``; empty lists where there are none."""

    sentences: list[list[str]]  # [E][<= 4]
    image_hashes: list[list[str]]  # [E][k] SHA-256 digests in the image store


def read_entity_media(media_file: str | Path, num_entities: int) -> EntityMedia:
    """The align stage's ``entities_media.parquet`` as one entry per entity ``0..E-1``;
    entities without a row get empty lists."""
    media = read_table(media_file, MEDIA_COLUMNS, "align")
    sentences: list[list[str]] = [[] for _ in range(num_entities)]
    image_hashes: list[list[str]] = [[] for _ in range(num_entities)]
    seen: set[int] = set()
    rows = zip(media["entity"].tolist(), media["sentences"].tolist(), media["image_hashes"].tolist())
    for row, (entity, entity_sentences, entity_images) in enumerate(rows):
        if not 0 <= entity < num_entities:
            raise DataError(media_file, f"row {row}: entity id {entity} is outside 0..{num_entities - 1}")
        if entity in seen:
            raise DataError(media_file, f"row {row}: entity {entity} has a second row")
        seen.add(entity)
        sentences[entity] = [str(sentence) for sentence in entity_sentences] if entity_sentences is not None else []
        image_hashes[entity] = [str(digest) for digest in entity_images] if entity_images is not None else []
    return EntityMedia(sentences, image_hashes)
