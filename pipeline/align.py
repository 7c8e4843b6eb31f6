"""Join the crawl results to the entities: one row per entity with its description
sentences and chosen images (see :mod:`pipeline.media` for the contract), plus coverage.

- Text: the description of the first source in ``description_sources`` that has one,
  split by :func:`split_sentences`, first ``max_sentences`` kept (the paper uses 4). An
  entity without a description gets its label as the single sentence (the key's local
  name, underscores as spaces, when the label is empty) and ``text_source = "label"``.
- Images: the distinct digests of the entity's downloaded images whose file is in the
  store; ``images_per_entity`` of them chosen at random without replacement by
  ``numpy.random.default_rng([seed, entity])`` over the sorted digests, so the choice of
  one entity depends only on the seed and its own images.

Extra columns beside :data:`pipeline.media.MEDIA_COLUMNS`: ``description_source`` (the
source of the description, null for label fallback) and ``images_available`` (int64).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.crawl.manifest import Manifest
from pipeline.crawl.sources import local_name
from pipeline.errors import ConfigError
from pipeline.media import MEDIA_COLUMNS, image_path

# Words that end with a period without ending a sentence (compared lower-case, without the period).
ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof sr jr st mt ft lt col gen gov sen rep rev hon capt sgt cpl pvt adm cmdr maj
    vs etc e.g i.e cf al approx ca c est inc ltd co corp bros no nos vol vols pp fig ed eds dept univ
    jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n u.s.a d.c b.c a.d op
""".split())
SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")
SCHEMA = pa.schema([
    ("entity", pa.int64()), ("sentences", pa.list_(pa.string())), ("text_source", pa.string()),
    ("image_hashes", pa.list_(pa.string())), ("description_source", pa.string()), ("images_available", pa.int64()),
])


@dataclass(frozen=True)
class AlignConfig:
    """The ``align`` section of params.yaml."""

    seed: int
    images_per_entity: int = 1
    max_sentences: int = 4
    description_sources: tuple[str, ...] = ("csv", "dbpedia-abstract")

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> AlignConfig:
        values = dict(section)
        values["description_sources"] = tuple(values.get("description_sources", cls.description_sources))
        try:
            config = cls(**values)
        except TypeError as error:
            raise ConfigError(f"align: {error}") from None
        if config.images_per_entity < 1 or config.max_sentences < 1:
            raise ConfigError("align.images_per_entity and align.max_sentences must be >= 1")
        return config


def split_sentences(text: str) -> list[str]:
    """Split ``text`` after ``.``, ``!`` or ``?`` (plus closing quotes/brackets) followed by
    white space and an upper-case letter, digit or opening quote/bracket — except after an
    abbreviation of :data:`ABBREVIATIONS` or a single-letter initial (``J. R. R. Tolkien``).
    Decimal numbers and URLs have no space after the period and are never split."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in SENTENCE_END.finditer(text):
        following = text[match.end():match.end() + 1]
        if not following or not (following.isupper() or following.isdigit() or following in "\"'(\u201c["):
            continue
        word = text[start:match.start()].rsplit(" ", 1)[-1].lstrip("(\"'\u201c").lower()
        if text[match.start()] == "." and (word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    return sentences + ([tail] if tail else [])


def choose_images(digests: list[str], count: int, seed: int, entity: int) -> list[str]:
    """``count`` of the distinct ``digests`` (all if fewer), seeded by ``(seed, entity)``."""
    pool = sorted(set(digests))
    if len(pool) <= count:
        return pool
    rng = np.random.default_rng([seed, entity])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=count, replace=False))]


def align(entities: pd.DataFrame, manifest_path: Path, store: Path, config: AlignConfig) -> tuple[pd.DataFrame, dict]:
    """The media table (one row per entity, ordered by id) and the coverage counts."""
    with Manifest(manifest_path, readonly=True) as manifest:
        description_rows = manifest.descriptions()
        image_rows = manifest.done_images()
    rank = {source: i for i, source in enumerate(config.description_sources)}
    descriptions: dict[int, tuple[int, str, str]] = {}
    for entity, source, text in description_rows:
        if source in rank and text.strip():
            candidate = (rank[source], source, text)
            descriptions[entity] = min(descriptions.get(entity, candidate), candidate)
    images: dict[int, list[str]] = {}
    missing_files = 0
    for entity, digest in image_rows:
        if image_path(store, digest).is_file():
            images.setdefault(entity, []).append(digest)
        else:
            missing_files += 1

    rows = []
    for entity in entities.sort_values("id").itertuples(index=False):
        entity_id = int(entity.id)
        if entity_id in descriptions:
            _, source, text = descriptions[entity_id]
            sentences, text_source = split_sentences(text)[:config.max_sentences], "description"
        else:
            label = entity.label if isinstance(entity.label, str) and entity.label.strip() else None
            sentences = [label.strip() if label else local_name(str(entity.key)).replace("_", " ")]
            source, text_source = None, "label"
        available = sorted(set(images.get(entity_id, [])))
        rows.append((entity_id, sentences, text_source,
                     choose_images(available, config.images_per_entity, config.seed, entity_id), source, len(available)))
    table = pd.DataFrame(rows, columns=[*MEDIA_COLUMNS, "description_source", "images_available"])
    with_description = int((table.text_source == "description").sum())
    with_images = int((table.images_available > 0).sum())
    coverage = {
        "entities": len(table),
        "with_description": with_description,
        "label_fallback": len(table) - with_description,
        "with_images": with_images,
        "with_text_and_images": int(((table.text_source == "description") & (table.images_available > 0)).sum()),
        "with_neither": int(((table.text_source == "label") & (table.images_available == 0)).sum()),
        "images_chosen": int(table.image_hashes.map(len).sum()),
        "images_missing_from_store": missing_files,
    }
    return table, coverage


def write_media(table: pd.DataFrame, target: Path) -> None:
    """Write the media table as parquet with a fixed schema, atomically."""
    with atomic_path(target) as tmp:
        pq.write_table(pa.Table.from_pandas(table, schema=SCHEMA, preserve_index=False), tmp)
