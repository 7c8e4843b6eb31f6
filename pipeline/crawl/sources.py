"""Where descriptions and image candidates come from.

A lookup source takes a batch of :class:`EntityRef` and returns a :class:`LookupResult`:
per entity a status (``done``/``missing``/``failed``/``unreachable``), plus the
descriptions, image candidate URLs (ranked, lower first) and Wikidata links found.

Web sources (endpoint base URLs from ``crawl.endpoints``):

- ``dbpedia-abstract``: ``dbo:abstract`` in ``crawl.language`` through the DBpedia SPARQL
  endpoint, ``crawl.sparql_batch`` entities per query (POSTed, JSON results);
- ``dbpedia-image``: ``foaf:depiction`` then ``dbo:thumbnail`` through the same endpoint,
  plus the entity's ``owl:sameAs`` Wikidata URI (DB15K and MKG-Y reach Wikidata that way);
- ``wikidata-p18``: the ``P18`` (image) claims of ``wbgetentities`` on the Wikidata API,
  ``crawl.wikidata_batch`` ids per request; a claim is a Commons file name.

Every Commons file (P18 values and DBpedia ``.../Special:FilePath/NAME`` URLs alike) is
fetched as ``<commons_file_path>NAME?width=<max_side>``: Commons redirects that to a
server-side thumbnail (PNG for SVG files), and one file met through several sources is
downloaded once.

Local sources (no network; they rescan on every run):

- ``local-folder``: image files ``DIR/<name>.<ext>`` or ``DIR/<name>/<anything>.<ext>``
  (ext in :data:`IMAGE_EXTENSIONS`, case-insensitive), where ``<name>`` is one of the
  entity's :func:`file_names`;
- ``csv``: a manifest with header ``key,image,description`` (any order; any value may be
  empty; several rows per key allowed). ``key`` is an entity key or one of its
  :func:`file_names`; ``image`` a path (relative to the CSV's folder) or an http(s) URL.
"""
from __future__ import annotations

import csv
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from pipeline.crawl.http import FetchError, HttpClient
from pipeline.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
NAMESPACES = (
    "http://dbpedia.org/resource/", "https://dbpedia.org/resource/",
    "http://www.wikidata.org/entity/", "https://www.wikidata.org/entity/",
    "http://yago-knowledge.org/resource/", "https://yago-knowledge.org/resource/",
)
WIKIDATA_PREFIXES = ("http://www.wikidata.org/entity/", "https://www.wikidata.org/entity/")
FILE_PATH_MARKER = "/Special:FilePath/"
CSV_COLUMNS = ("key", "image", "description")
SPARQL_IRI_ESCAPES = {c: urllib.parse.quote(c) for c in '<>"{}|^`\\ '}


@dataclass(frozen=True)
class EntityRef:
    id: int
    key: str
    dbpedia: str | None
    wikidata: str | None


@dataclass
class LookupResult:
    outcomes: list[tuple[int, str, str | None]] = field(default_factory=list)  # (entity, status, reason)
    descriptions: list[tuple[int, str]] = field(default_factory=list)  # (entity, text)
    candidates: list[tuple[int, str, int]] = field(default_factory=list)  # (entity, url, priority)
    links: list[tuple[int, str]] = field(default_factory=list)  # (entity, wikidata uri)


class LookupSource(Protocol):
    name: str
    batch_size: int

    def lookup(self, batch: list[EntityRef]) -> LookupResult: ...


def local_name(key: str) -> str:
    """The key without its namespace: ``http://dbpedia.org/resource/AC/DC`` -> ``AC/DC``."""
    key = key.strip().removeprefix("<").removesuffix(">")
    for namespace in NAMESPACES:
        if key.startswith(namespace):
            return key[len(namespace):]
    return key.rsplit("/", 1)[-1] if "://" in key else key


def file_names(key: str) -> tuple[str, ...]:
    """File-system-safe names an entity's files may carry: the local name as is (when it
    has no ``/``) and percent-encoded (``urllib.parse.quote(name, safe="")``)."""
    name = local_name(key)
    encoded = urllib.parse.quote(name, safe="")
    return tuple(dict.fromkeys(n for n in (name, encoded) if n and "/" not in n))


def commons_file_name(url: str) -> str | None:
    """``NAME`` of a ``.../Special:FilePath/NAME[?...]`` URL, unquoted, spaces as ``_``."""
    if FILE_PATH_MARKER not in url:
        return None
    name = url.split(FILE_PATH_MARKER, 1)[1].split("?", 1)[0].split("#", 1)[0]
    return urllib.parse.unquote(name).replace(" ", "_") or None


def commons_url(name: str, base: str, width: int) -> str:
    return f"{base}{urllib.parse.quote(name.replace(' ', '_'), safe='')}?width={width}"


def _failure(batch: list[EntityRef], error: FetchError) -> LookupResult:
    status = "unreachable" if error.unreachable else "failed"
    return LookupResult(outcomes=[(entity.id, status, error.reason) for entity in batch])


def _json(body: bytes, what: str) -> dict:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FetchError(f"malformed JSON from {what}: {error}") from None
    if not isinstance(payload, dict):
        raise FetchError(f"malformed JSON from {what}: not an object")
    return payload


@dataclass
class _Sparql:
    client: HttpClient
    endpoint: str

    def select(self, query: str) -> list[dict]:
        """The bindings of a SELECT query (SPARQL 1.1 JSON results format)."""
        response = self.client.fetch(
            self.endpoint, method="POST",
            data={"query": query, "format": "application/sparql-results+json"},
            headers={"Accept": "application/sparql-results+json"})
        bindings = _json(response.content, self.endpoint).get("results", {}).get("bindings")
        if not isinstance(bindings, list):
            raise FetchError(f"malformed SPARQL JSON from {self.endpoint}: no results.bindings")
        return bindings


def _iri(uri: str) -> str:
    return "<" + "".join(SPARQL_IRI_ESCAPES.get(c, c) for c in uri) + ">"


def _by_uri(batch: list[EntityRef]) -> dict[str, list[EntityRef]]:
    index: dict[str, list[EntityRef]] = {}
    for entity in batch:
        index.setdefault(_iri(entity.dbpedia)[1:-1], []).append(entity)
    return index


def _split_linked(batch: list[EntityRef], attribute: str, what: str) -> tuple[list[EntityRef], LookupResult]:
    linked = [entity for entity in batch if getattr(entity, attribute)]
    result = LookupResult(outcomes=[(e.id, "missing", f"no {what} URI") for e in batch if not getattr(e, attribute)])
    return linked, result


def _select_linked(
    sparql: _Sparql, batch: list[EntityRef], query_for: Callable[[str], str]
) -> tuple[list[EntityRef], dict[str, list[EntityRef]], list[dict] | None, LookupResult]:
    """Run ``query_for(values)`` (``values``: the batch's DBpedia URIs as SPARQL ``<uri>`` terms).

    Returns the linked entities, their URI index, the bindings, and the result so far; the
    bindings are None when no entity is linked or the query failed (the result then holds
    every entity's outcome).
    """
    linked, result = _split_linked(batch, "dbpedia", "DBpedia")
    if not linked:
        return linked, {}, None, result
    index = _by_uri(linked)
    try:
        return linked, index, sparql.select(query_for(" ".join(f"<{uri}>" for uri in index))), result
    except FetchError as error:
        return linked, index, None, LookupResult(outcomes=result.outcomes + _failure(linked, error).outcomes)


class DbpediaAbstracts:
    """``dbo:abstract`` in one language, many entities per SPARQL query."""

    name = "dbpedia-abstract"

    def __init__(self, client: HttpClient, endpoint: str, language: str, batch_size: int):
        self.sparql, self.language, self.batch_size = _Sparql(client, endpoint), language, batch_size

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        linked, index, bindings, result = _select_linked(self.sparql, batch, lambda values: (
            "PREFIX dbo: <http://dbpedia.org/ontology/>\n"
            f"SELECT ?e ?abstract WHERE {{ VALUES ?e {{ {values} }}\n"
            f"  ?e dbo:abstract ?abstract FILTER(LANG(?abstract) = \"{self.language}\") }}"))
        if bindings is None:
            return result
        found: dict[int, str] = {}
        for row in bindings:
            text = row.get("abstract", {}).get("value", "").strip()
            for entity in index.get(row.get("e", {}).get("value", ""), []):
                if text and entity.id not in found:
                    found[entity.id] = text
        result.descriptions.extend(found.items())
        result.outcomes.extend((e.id, "done", None) if e.id in found else (e.id, "missing", "no abstract")
                               for e in linked)
        return result


class DbpediaImages:
    """``foaf:depiction`` / ``dbo:thumbnail`` image URLs and the ``owl:sameAs`` Wikidata URI."""

    name = "dbpedia-image"
    PREDICATES = {  # predicate -> priority offset (depiction is the full file)
        "http://xmlns.com/foaf/0.1/depiction": 0,
        "http://dbpedia.org/ontology/thumbnail": 1,
    }
    SAME_AS = "http://www.w3.org/2002/07/owl#sameAs"

    def __init__(self, client: HttpClient, endpoint: str, batch_size: int, priority: int,
                 commons_base: str, width: int):
        self.sparql, self.batch_size, self.priority = _Sparql(client, endpoint), batch_size, priority
        self.commons_base, self.width = commons_base, width

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        predicates = " ".join(f"<{p}>" for p in (*self.PREDICATES, self.SAME_AS))
        linked, index, bindings, result = _select_linked(self.sparql, batch, lambda values: (
            f"SELECT ?e ?p ?o WHERE {{ VALUES ?e {{ {values} }}\n"
            f"  VALUES ?p {{ {predicates} }} ?e ?p ?o\n"
            f"  FILTER(?p != <{self.SAME_AS}> || STRSTARTS(STR(?o), \"http://www.wikidata.org/entity/\")) }}"))
        if bindings is None:
            return result
        images: dict[int, set[str]] = {}
        for row in bindings:
            predicate, value = row.get("p", {}).get("value"), row.get("o", {}).get("value", "")
            for entity in index.get(row.get("e", {}).get("value", ""), []):
                if predicate == self.SAME_AS and value.startswith(WIKIDATA_PREFIXES):
                    result.links.append((entity.id, value))
                elif predicate in self.PREDICATES and value:
                    name = commons_file_name(value)
                    url = commons_url(name, self.commons_base, self.width) if name else value
                    if url not in images.setdefault(entity.id, set()):
                        images[entity.id].add(url)
                        result.candidates.append((entity.id, url, self.priority + self.PREDICATES[predicate]))
        result.outcomes.extend((e.id, "done", None) if images.get(e.id) else (e.id, "missing", "no depiction/thumbnail")
                               for e in linked)
        return result


class WikidataImages:
    """``P18`` claims (Commons file names) through ``wbgetentities``, many ids per request."""

    name = "wikidata-p18"

    def __init__(self, client: HttpClient, api: str, batch_size: int, priority: int, commons_base: str, width: int):
        self.client, self.api, self.batch_size, self.priority = client, api, batch_size, priority
        self.commons_base, self.width = commons_base, width

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        linked, result = _split_linked(batch, "wikidata", "Wikidata")
        if not linked:
            return result
        ids = {entity.id: entity.wikidata.rstrip("/").rsplit("/", 1)[-1] for entity in linked}
        query = urllib.parse.urlencode({"action": "wbgetentities", "ids": "|".join(sorted(set(ids.values()))),
                                        "props": "claims", "format": "json"})
        try:
            payload = _json(self.client.fetch(f"{self.api}?{query}").content, self.api)
        except FetchError as error:
            return LookupResult(outcomes=result.outcomes + _failure(linked, error).outcomes)
        entities = payload.get("entities") if isinstance(payload.get("entities"), dict) else {}
        for entity in linked:
            record = entities.get(ids[entity.id])
            if not isinstance(record, dict) or "missing" in record:
                result.outcomes.append((entity.id, "missing", f"Wikidata has no entity {ids[entity.id]}"))
                continue
            files = self._p18_files(record)
            result.candidates.extend((entity.id, commons_url(name, self.commons_base, self.width), self.priority + i)
                                     for i, name in enumerate(files))
            result.outcomes.append((entity.id, "done", None) if files else (entity.id, "missing", "no P18 claim"))
        return result

    @staticmethod
    def _p18_files(record: dict) -> list[str]:
        """P18 file names, preferred-rank claims first, deprecated ones dropped."""
        claims = (record.get("claims") or {}).get("P18") or []
        ranked = []
        for claim in claims:
            value = ((claim.get("mainsnak") or {}).get("datavalue") or {}).get("value")
            if isinstance(value, str) and value and claim.get("rank") != "deprecated":
                ranked.append((claim.get("rank") != "preferred", value))
        return list(dict.fromkeys(value for _, value in sorted(ranked, key=lambda pair: pair[0])))


class LocalFolder:
    """Images in a folder, matched to entities by :func:`file_names`."""

    name = "local-folder"

    def __init__(self, folder: Path, priority: int):
        if not folder.is_dir():
            raise DataError(folder, "image folder not found")
        self.priority = priority
        self.files: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_dir():
                images = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
                self.files.setdefault(path.name, []).extend(images)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                self.files.setdefault(path.stem, []).append(path)
        self.batch_size = 1 << 30  # no network: one batch

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        result = LookupResult()
        for entity in batch:
            paths = [path for name in file_names(entity.key) for path in self.files.get(name, [])]
            result.candidates.extend((entity.id, str(path.resolve()), self.priority + i) for i, path in enumerate(paths))
            result.outcomes.append((entity.id, "done", None) if paths else (entity.id, "missing", "no file"))
        return result


class CsvManifest:
    """Rows ``key,image,description`` of a user's CSV file."""

    name = "csv"

    def __init__(self, path: Path, priority: int):
        self.path, self.priority = path, priority
        self.rows = self._read(path)
        self.batch_size = 1 << 30  # no network: one batch
        self.unmatched_keys: set[str] = set()

    @staticmethod
    def _read(path: Path) -> list[tuple[str, str, str]]:
        if not path.is_file():
            raise DataError(path, "CSV manifest not found")
        rows = []
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, strict=True)
            try:
                header = next(reader, None)
                if header is None or sorted(h.strip() for h in header) != sorted(CSV_COLUMNS):
                    raise DataError(path, f"header must be the columns {','.join(CSV_COLUMNS)} (any order)", line=1,
                                    content=",".join(header or []))
                order = [[h.strip() for h in header].index(column) for column in CSV_COLUMNS]
                for fields in reader:
                    if not fields:
                        continue
                    if len(fields) != len(CSV_COLUMNS):
                        raise DataError(path, f"expected {len(CSV_COLUMNS)} fields, got {len(fields)}",
                                        line=reader.line_num, content=",".join(fields))
                    key, image, description = (fields[i].strip() for i in order)
                    if not key:
                        raise DataError(path, "empty key", line=reader.line_num, content=",".join(fields))
                    rows.append((key, image, description))
            except csv.Error as error:
                raise DataError(path, f"malformed CSV: {error}", line=reader.line_num) from None
            except UnicodeDecodeError as error:
                raise DataError(path, f"not UTF-8: {error}", line=reader.line_num + 1) from None
        return rows

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        by_name: dict[str, int] = {}
        for entity in batch:
            for name in (entity.key, *file_names(entity.key)):
                by_name.setdefault(name, entity.id)
        found: dict[int, bool] = {}
        described: set[int] = set()
        result = LookupResult()
        for position, (key, image, description) in enumerate(self.rows):
            entity = by_name.get(key, by_name.get(local_name(key)))
            if entity is None:
                self.unmatched_keys.add(key)
                continue
            found[entity] = True
            if description and entity not in described:
                described.add(entity)
                result.descriptions.append((entity, description))
            if image:
                is_url = image.lower().startswith(("http://", "https://"))
                location = image if is_url else str((self.path.parent / image).resolve())
                result.candidates.append((entity, location, self.priority + position))
        result.outcomes.extend((e.id, "done", None) if e.id in found else (e.id, "missing", "no CSV row")
                               for e in batch)
        return result
