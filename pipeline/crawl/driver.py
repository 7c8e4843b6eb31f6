"""The crawl: look up descriptions and image candidates for every entity, then download,
verify and store the images, recording everything in the :class:`Manifest`.

Order of work (each step resumes from the manifest):

1. lookups, source by source: ``dbpedia-abstract``, ``dbpedia-image``, ``wikidata-p18``
   (after ``dbpedia-image``, whose ``owl:sameAs`` links give Wikidata ids to entities that
   have none), or the one local source. Entities with a final lookup row are skipped;
2. downloads in rounds: each round takes, for every entity with fewer than
   ``images_per_entity`` done images, its best-ranked pending candidates (rank: order of
   ``crawl.sources``, then the source's own order), so a failed candidate is replaced by
   the next one in the following round.

No fault of one item stops the crawl: any exception while looking up a batch or
downloading an image (a reply of unexpected shape, a decoder's bug, ...) records that
batch's entities or that image ``failed`` with the exception as reason, and the run goes
on. Results are committed one batch or image at a time as they finish, and when the run
is interrupted (Ctrl-C, an error writing the manifest) the items already finished are
recorded before it stops.

A new run first makes ``unreachable`` work pending again, and with ``retry_failed`` also
``failed`` work. Hosts that cannot be reached are marked down after a few connection
failures (see :mod:`pipeline.crawl.http`), so a crawl without network ends in seconds.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from tqdm import tqdm

from pipeline.crawl.http import FetchError, HttpClient, HttpConfig
from pipeline.crawl.images import ImageConfig, ImageRejected, normalise_image, store_image
from pipeline.crawl.manifest import Manifest
from pipeline.crawl.sources import (CsvManifest, DbpediaAbstracts, DbpediaImages, EntityRef, LocalFolder,
                                    LookupResult, LookupSource, WikidataImages)
from pipeline.errors import ConfigError, unknown_key
from pipeline.tables import read_table

WEB_SOURCES = ("dbpedia-abstract", "dbpedia-image", "wikidata-p18")
LOCAL_SOURCES = ("local-folder", "csv")
PRIORITY_STRIDE = 1_000_000  # priorities of the i-th source start at i * stride
ENTITY_COLUMNS = ("id", "key", "label", "dbpedia", "wikidata")


@dataclass(frozen=True)
class Endpoints:
    """The ``crawl.endpoints`` section: base URLs of the services."""

    dbpedia_sparql: str
    wikidata_api: str
    commons_file_path: str  # a Commons file NAME is <commons_file_path>NAME


@dataclass(frozen=True)
class CrawlConfig:
    """The ``crawl`` section of params.yaml."""

    sources: tuple[str, ...]
    images_per_entity: int
    language: str
    sparql_batch: int
    wikidata_batch: int
    endpoints: Endpoints
    http: HttpConfig
    image: ImageConfig

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> CrawlConfig:
        def build(kind, values, where):
            if not isinstance(values, dict):
                raise ConfigError(f"{where} must be a mapping")
            names = {f.name for f in fields(kind)}
            for key in values:
                if key not in names:
                    raise unknown_key(where, key, names)
            try:
                return kind(**values)
            except TypeError as error:
                raise ConfigError(f"{where}: {error}") from None

        values = dict(section)
        nested = {"endpoints": Endpoints, "http": HttpConfig, "image": ImageConfig}
        for key, kind in nested.items():
            values[key] = build(kind, values.get(key, {}), f"crawl.{key}")
        values["sources"] = tuple(values.get("sources", ()))
        config = build(cls, values, "crawl")
        unknown = [s for s in config.sources if s not in WEB_SOURCES]
        if unknown or not config.sources:
            raise ConfigError(f"crawl.sources: unknown {unknown}; valid: {list(WEB_SOURCES)}")
        for name in ("images_per_entity", "sparql_batch", "wikidata_batch"):
            if int(getattr(config, name)) < 1:
                raise ConfigError(f"crawl.{name} must be >= 1, got {getattr(config, name)!r}")
        if not re.fullmatch(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*", str(config.language)):  # goes into a SPARQL query
            raise ConfigError(f"crawl.language must be a language tag such as en or pt-BR, got {config.language!r}")
        return config


@dataclass
class CrawlSummary:
    entities: int
    counts: dict[str, dict[str, int]]
    down_hosts: dict[str, str] = field(default_factory=dict)
    unmatched_keys: int = 0

    def line(self) -> str:
        """One line: entity count, status counts per lookup source and for images, hosts down."""
        parts = [f"{self.entities} entities"]
        for what, by_status in self.counts.items():
            parts.append(f"{what.removeprefix('lookups:')} " + " ".join(f"{s}={n}" for s, n in sorted(by_status.items())))
        if "images" not in self.counts:
            parts.append("images none")
        if self.down_hosts:
            parts.append("unreachable hosts: " + " ".join(sorted(self.down_hosts)))
        if self.unmatched_keys:
            parts.append(f"{self.unmatched_keys} CSV keys match no entity")
        return "; ".join(parts)


def read_entities(path: Path) -> pd.DataFrame:
    """``entities.parquet`` of the download stage, with the columns the crawl uses."""
    return read_table(path, ENTITY_COLUMNS, "download", all_columns=True)


def _refs(entities: pd.DataFrame, links: dict[int, str]) -> list[EntityRef]:
    def text(value) -> str | None:
        return None if value is None or pd.isna(value) or not str(value).strip() else str(value).strip()

    return [EntityRef(int(row.id), str(row.key), text(row.dbpedia), text(row.wikidata) or links.get(int(row.id)))
            for row in entities.itertuples(index=False)]


class Crawler:
    """Runs one crawl into ``manifest`` and the image ``store``."""

    def __init__(self, config: CrawlConfig, manifest: Manifest, store: Path, client: HttpClient, progress: bool = True):
        self.config, self.manifest, self.store, self.client, self.progress = config, manifest, store, client, progress

    def web_sources(self) -> list[LookupSource]:
        """The configured web sources in lookup order (dbpedia-image before wikidata-p18)."""
        c, e = self.config, self.config.endpoints
        priority = {name: i * PRIORITY_STRIDE for i, name in enumerate(c.sources)}
        width = c.image.max_side
        built = {
            "dbpedia-abstract": lambda: DbpediaAbstracts(self.client, e.dbpedia_sparql, c.language, c.sparql_batch),
            "dbpedia-image": lambda: DbpediaImages(self.client, e.dbpedia_sparql, c.sparql_batch,
                                                   priority["dbpedia-image"], e.commons_file_path, width),
            "wikidata-p18": lambda: WikidataImages(self.client, e.wikidata_api, c.wikidata_batch,
                                                   priority["wikidata-p18"], e.commons_file_path, width),
        }
        return [built[name]() for name in WEB_SOURCES if name in c.sources]

    def run_lookups(self, source: LookupSource, entities: pd.DataFrame, rescan: bool) -> None:
        refs = _refs(entities, self.manifest.wikidata_links())
        if not rescan:
            done = self.manifest.looked_up(source.name)
            refs = [ref for ref in refs if ref.id not in done]
        if source.name == "wikidata-p18" and "dbpedia-image" in self.config.sources:
            refs = self._blocked_by_dbpedia(refs)
        batches = [refs[i:i + source.batch_size] for i in range(0, len(refs), source.batch_size)]
        self._parallel(batches, lambda batch: _lookup(source, batch), lambda _, result: self.manifest.record_lookups(
            source.name, result.outcomes, result.descriptions, result.candidates, result.links),
            f"lookup {source.name}", len(refs), lambda batch: len(batch))

    def _blocked_by_dbpedia(self, refs: list[EntityRef]) -> list[EntityRef]:
        """Entities without a Wikidata URI whose DBpedia lookup (which may give one) did not
        complete get that lookup's status now; the others go on to Wikidata."""
        status = self.manifest.lookup_status("dbpedia-image")
        blocked = [r for r in refs if not r.wikidata and status.get(r.id) in ("failed", "unreachable")]
        self.manifest.record_lookups("wikidata-p18", [
            (r.id, status[r.id], f"no Wikidata URI known: its dbpedia-image lookup is {status[r.id]}") for r in blocked])
        blocked_ids = {r.id for r in blocked}
        return [r for r in refs if r.id not in blocked_ids]

    def run_downloads(self) -> None:
        while rows := self.manifest.next_downloads(self.config.images_per_entity):
            self._parallel(rows, lambda row: self._download(row[1], row[2]),
                           lambda row, outcome: self.manifest.record_image(row[0], row[1], *outcome),
                           "download images", len(rows), lambda _: 1)

    def _download(self, url: str, source: str) -> tuple[str, str | None, str | None]:
        """``(status, digest, reason)`` of downloading, verifying and storing one image."""
        try:
            if source in LOCAL_SOURCES and not url.lower().startswith(("http://", "https://")):
                data = self._read_local(Path(url))
            else:
                data = self.client.fetch(url).content
            return "done", store_image(normalise_image(data, self.config.image), self.store), None
        except FetchError as error:
            return ("unreachable" if error.unreachable else "failed"), None, error.reason
        except ImageRejected as error:
            return "failed", None, f"image rejected: {error}"
        except Exception as error:  # never let one image stop the crawl
            return "failed", None, _unexpected(error)

    def _read_local(self, path: Path) -> bytes:
        """The bytes of a local candidate: a regular file, at most ``max_bytes``, whose
        (resolved, at lookup) path has not turned into a symlink since."""
        limit = self.config.http.max_bytes
        if os.path.realpath(path) != str(path):
            raise FetchError(f"refused {path}: a symlink now stands in its path")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise FetchError(f"cannot open {path}: {error.strerror or type(error).__name__}") from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FetchError(f"refused {path}: not a regular file")
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise FetchError(f"{path} is larger than max_bytes {limit}")
        return data

    def _parallel(self, items: list, work: Callable, record: Callable, what: str, total: int,
                  size: Callable[[Any], int]) -> None:
        """Run ``work(item)`` on a thread pool; ``record(item, result)`` in this thread as
        each finishes (the manifest is written by one thread only). If this loop is
        interrupted, the work not started is cancelled and what finished is still recorded."""
        pool = ThreadPoolExecutor(self.config.http.concurrency)
        futures = {pool.submit(work, item): item for item in items}
        recorded = set()
        try:
            with tqdm(total=total, desc=what, unit="item", disable=not self.progress, leave=False) as bar:
                for future in as_completed(futures):
                    record(futures[future], future.result())
                    recorded.add(future)
                    bar.update(size(futures[future]))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the running items finish
            for future, item in futures.items():
                if future not in recorded and not future.cancelled() and future.exception() is None:
                    with contextlib.suppress(Exception):  # the original error is the one to report
                        record(item, future.result())
            raise
        pool.shutdown()


def _unexpected(error: Exception) -> str:
    return f"unexpected error: {type(error).__name__}: {error}"


def _lookup(source: LookupSource, batch: list[EntityRef]) -> LookupResult:
    """``source.lookup(batch)``; any exception fails every entity of the batch."""
    try:
        return source.lookup(batch)
    except Exception as error:  # never let one batch stop the crawl
        return LookupResult(outcomes=[(entity.id, "failed", _unexpected(error)) for entity in batch])


def crawl(entities: pd.DataFrame, manifest_path: Path, store: Path, config: CrawlConfig, *,
          source: str = "web", folder: Path | None = None, csv_manifest: Path | None = None,
          retry_failed: bool = False, progress: bool = True) -> CrawlSummary:
    """Crawl descriptions and images of ``entities`` (see the module docstring).

    ``source`` is ``"web"`` (the ``crawl.sources``), ``"local-folder"`` (needs ``folder``)
    or ``"csv"`` (needs ``csv_manifest``).
    """
    if source == "local-folder":
        if folder is None:
            raise ConfigError("--source local-folder needs --folder DIR")
        local: LookupSource | None = LocalFolder(folder, 0)
    elif source == "csv":
        if csv_manifest is None:
            raise ConfigError("--source csv needs --manifest FILE")
        local = CsvManifest(csv_manifest, 0)
    elif source == "web":
        local = None
    else:
        raise ConfigError(f"unknown source {source!r}; valid: web, {', '.join(LOCAL_SOURCES)}")
    store.mkdir(parents=True, exist_ok=True)
    with Manifest(manifest_path) as manifest, HttpClient(config.http) as client:
        manifest.reopen_for_retry(retry_failed)
        crawler = Crawler(config, manifest, store, client, progress)
        if local is None:
            for web_source in crawler.web_sources():
                crawler.run_lookups(web_source, entities, rescan=False)
        else:
            crawler.run_lookups(local, entities, rescan=True)
        crawler.run_downloads()
        return CrawlSummary(len(entities), manifest.counts(), client.down_hosts(),
                            len(getattr(local, "unmatched_keys", ())))
