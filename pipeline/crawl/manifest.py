"""The crawl manifest: an SQLite file (WAL journal) that records every lookup and every image
with its status, so a killed crawl resumes where it stopped and nothing done is lost.

Each result is committed as soon as it arrives (one transaction per lookup batch or image).
Closing a writer rewrites the file canonically (rows in key order, no clock time), so
identical crawls leave byte-identical files.
Text is stored as valid UTF-8 whatever it holds (a lone surrogate is written as ``\\udXXX``),
and a reason is cut at :data:`MAX_REASON` characters, so no text can fail a write.

Tables:

- ``lookups(entity, source, status, reason, updated)``: one row per entity and source
  (``dbpedia-abstract``, ``dbpedia-image``, ``wikidata-p18``, ``local-folder``, ``csv``);
- ``descriptions(entity, source, text)``: descriptions found by lookups;
- ``links(entity, wikidata)``: Wikidata URIs learnt from DBpedia ``owl:sameAs``;
- ``images(entity, url, source, priority, status, digest, reason, attempts, updated)``: image
  candidates found by lookups (``status='pending'``) and the outcome of their download.

``updated`` is the number of the crawl run (1, 2, ...; ``PRAGMA user_version`` holds the last)
that last wrote the row: a run number, not a clock time, keeps the file deterministic.

Statuses (:data:`STATUSES`): ``pending`` (image not yet downloaded), ``done``, ``missing``
(the source has nothing for the entity), ``failed`` (final for this run; ``--retry-failed``
retries), ``unreachable`` (the host could not be reached; retried by every new run).
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable

from pipeline.errors import DataError

STATUSES = ("pending", "done", "missing", "failed", "unreachable")
MAX_REASON = 1000  # characters
KEYS = {"lookups": "entity, source", "descriptions": "entity, source", "links": "entity", "images": "entity, url"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS lookups (
    entity INTEGER NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    updated REAL NOT NULL, PRIMARY KEY (entity, source));
CREATE TABLE IF NOT EXISTS descriptions (
    entity INTEGER NOT NULL, source TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (entity, source));
CREATE TABLE IF NOT EXISTS links (entity INTEGER PRIMARY KEY, wikidata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    entity INTEGER NOT NULL, url TEXT NOT NULL, source TEXT NOT NULL, priority INTEGER NOT NULL,
    status TEXT NOT NULL, digest TEXT, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL, PRIMARY KEY (entity, url));
"""


def _text(value: str | None, limit: int | None = None) -> str | None:
    """``value`` as storable UTF-8 text (lone surrogates backslash-escaped), at most ``limit`` characters."""
    if value is None:
        return None
    value = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return value if limit is None or len(value) <= limit else value[:limit - 1] + "…"


class Manifest:
    """The manifest of one crawl directory. Use from a single thread.

    A writer uses the WAL journal while open; on close it replaces the file (atomically) by a
    canonical copy in a plain rollback journal, so a finished crawl leaves one self-contained,
    deterministic file; after a kill the ``-wal`` file holds the committed work and the next
    open recovers it. ``readonly`` opens an
    existing manifest without writing anything (the align stage).
    """

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path, self.readonly = Path(path), readonly
        if readonly:
            if not self.path.is_file():
                raise DataError(self.path, "crawl manifest not found (run the crawl stage first)")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.run = self._db.execute("PRAGMA user_version").fetchone()[0] + 1
        self._db.execute(f"PRAGMA user_version={self.run}")
        self._db.commit()

    def close(self) -> None:
        if self.readonly:
            self._db.close()
            return
        canonical = self.path.with_name(f".{self.path.name}.canonical")
        canonical.unlink(missing_ok=True)
        self._db.commit()
        self._db.execute("ATTACH DATABASE ? AS canonical", (str(canonical),))
        with self._db:
            self._db.executescript(SCHEMA.replace("IF NOT EXISTS ", "IF NOT EXISTS canonical."))
            for table, key in KEYS.items():
                self._db.execute(f"INSERT INTO canonical.{table} SELECT * FROM main.{table} ORDER BY {key}")
        self._db.execute(f"PRAGMA canonical.user_version={self.run}")
        self._db.execute("DETACH DATABASE canonical")
        self._db.close()
        os.replace(canonical, self.path)

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- resuming -------------------------------------------------------------------
    def reopen_for_retry(self, retry_failed: bool) -> None:
        """Make unreachable (and with ``retry_failed`` also failed) work pending again."""
        statuses = ("unreachable", "failed") if retry_failed else ("unreachable",)
        marks = ",".join("?" * len(statuses))
        with self._db:
            self._db.execute(f"DELETE FROM lookups WHERE status IN ({marks})", statuses)
            self._db.execute(f"UPDATE images SET status='pending', reason=NULL WHERE status IN ({marks})", statuses)

    def looked_up(self, source: str) -> set[int]:
        """Entities whose ``source`` lookup has a final row."""
        return {row[0] for row in self._db.execute("SELECT entity FROM lookups WHERE source=?", (source,))}

    def lookup_status(self, source: str) -> dict[int, str]:
        return dict(self._db.execute("SELECT entity, status FROM lookups WHERE source=?", (source,)))

    # --- recording ------------------------------------------------------------------
    def record_lookups(self, source: str, outcomes: Iterable[tuple[int, str, str | None]],
                       descriptions: Iterable[tuple[int, str]] = (),
                       candidates: Iterable[tuple[int, str, int]] = (),
                       links: Iterable[tuple[int, str]] = ()) -> None:
        """One transaction: lookup ``(entity, status, reason)`` rows of ``source`` with the
        descriptions ``(entity, text)``, image candidates ``(entity, url, priority)`` (lower first) and Wikidata
        links ``(entity, uri)`` they found."""
        now = self.run
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO descriptions VALUES (?, ?, ?)",
                [(entity, source, _text(text)) for entity, text in descriptions])
            self._db.executemany(
                "INSERT OR IGNORE INTO images (entity, url, source, priority, status, updated) VALUES (?, ?, ?, ?, 'pending', ?)",
                [(entity, _text(url), source, priority, now) for entity, url, priority in candidates])
            self._db.executemany("INSERT OR REPLACE INTO links VALUES (?, ?)", [(e, _text(uri)) for e, uri in links])
            self._db.executemany(
                "INSERT OR REPLACE INTO lookups VALUES (?, ?, ?, ?, ?)",
                [(entity, source, status, _text(reason, MAX_REASON), now) for entity, status, reason in outcomes])

    def record_image(self, entity: int, url: str, status: str, digest: str | None, reason: str | None) -> None:
        with self._db:
            self._db.execute(
                "UPDATE images SET status=?, digest=?, reason=?, attempts=attempts+1, updated=? WHERE entity=? AND url=?",
                (status, digest, _text(reason, MAX_REASON), self.run, entity, url))

    # --- reading --------------------------------------------------------------------
    def wikidata_links(self) -> dict[int, str]:
        return dict(self._db.execute("SELECT entity, wikidata FROM links"))

    def next_downloads(self, per_entity: int) -> list[tuple[int, str, str]]:
        """``(entity, url, source)`` of the best-ranked pending candidates of every entity
        that has fewer than ``per_entity`` done images: as many as it still lacks."""
        rows = self._db.execute(
            """SELECT entity, url, source FROM (
                   SELECT entity, url, source, status, priority,
                          ROW_NUMBER() OVER (PARTITION BY entity, status = 'pending' ORDER BY priority, url) AS position,
                          SUM(status = 'done') OVER (PARTITION BY entity) AS done
                   FROM images)
               WHERE status = 'pending' AND position <= ? - done
               ORDER BY entity, position""", (per_entity,))
        return list(rows)

    def descriptions(self) -> list[tuple[int, str, str]]:
        return list(self._db.execute("SELECT entity, source, text FROM descriptions"))

    def done_images(self) -> list[tuple[int, str]]:
        return list(self._db.execute("SELECT entity, digest FROM images WHERE status='done' ORDER BY entity, priority"))

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"lookups:<source>" | "images": {status: count}}``."""
        result: dict[str, dict[str, int]] = {}
        for source, status, count in self._db.execute(
                "SELECT source, status, COUNT(*) FROM lookups GROUP BY source, status ORDER BY source"):
            result.setdefault(f"lookups:{source}", {})[status] = count
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM images GROUP BY status"):
            result.setdefault("images", {})[status] = count
        return result
