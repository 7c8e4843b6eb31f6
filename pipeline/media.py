"""The contract between the crawl/align stages and feature extraction.

Images live in a content-addressed store: the file of SHA-256 hex digest ``D`` (of the
stored bytes, RGB JPEG after resizing) is ``<store>/<D[:2]>/<D>.jpg``. No path is ever
built from an entity name.

The align stage writes one row per entity to ``entities_media.parquet`` with the columns
of :data:`MEDIA_COLUMNS`:

- ``entity`` int64: entity id;
- ``sentences`` list<string>: up to 4 description sentences (or the label, see below);
- ``text_source`` string: ``"description"`` or ``"label"`` (label fallback, flagged);
- ``image_hashes`` list<string>: digests of the entity's chosen images, possibly empty.
"""
from __future__ import annotations

from pathlib import Path

MEDIA_COLUMNS = ("entity", "sentences", "text_source", "image_hashes")
TEXT_SOURCES = ("description", "label")


def image_path(store: str | Path, digest: str) -> Path:
    """Path of the image with SHA-256 hex ``digest`` in the content-addressed ``store``."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    return Path(store) / digest[:2] / f"{digest}.jpg"
