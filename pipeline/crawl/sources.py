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

Replies are validated: a reply that is not the expected JSON shape fails the batch; a row
or record of the wrong shape (a list or number where an object or string belongs, a string
with a lone surrogate) fails the entity it belongs to. Either way the entities are recorded
``failed`` with the reason (retried by ``--retry-failed``), never ``missing``. DBpedia IRIs
are sent with every character the SPARQL ``IRIREF`` grammar excludes percent-encoded.

Every Commons file (P18 values and DBpedia ``.../Special:FilePath/NAME`` URLs alike) is
fetched as ``<commons_file_path>NAME?width=<max_side>``: Commons redirects that to a
server-side thumbnail (PNG for SVG files), and one file met through several sources is
downloaded once.

Local sources (no network; they rescan on every run):

- ``local-folder``: image files ``DIR/<name>.<ext>`` or ``DIR/<name>/<anything>.<ext>``
  (ext in :data:`IMAGE_EXTENSIONS`, case-insensitive), where ``<name>`` is one of the
  entity's :func:`file_names`. Entries that resolve outside the folder (symlinks) or are
  not regular files are refused: an entity with only refused files is ``failed``;
- ``csv``: a manifest with header ``key,image,description`` (any order; any value may be
  empty; several rows per key allowed). ``key`` is an entity key or one of its
  :func:`file_names`; ``image`` a path (relative to the CSV's folder) or an http(s) URL.
  A path that cannot be resolved (symlink loop, NUL byte) fails its entity.
"""
from __future__ import annotations

import csv
import json
import re
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
# IRIREF ::= '<' ([^<>"{}|^`\]-[#x00-#x20])* '>' (SPARQL 1.1): these characters are percent-encoded
SPARQL_IRI_ESCAPES = {c: f"%{ord(c):02X}" for c in [*map(chr, range(0x21)), *'<>"{}|^`\\']}
WIKIDATA_ITEM = re.compile(r"Q[1-9][0-9]*")


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
    key = key.strip()
    if key.startswith("<") and key.endswith(">"):  # an N-Triples style <IRI>
        key = key[1:-1]
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


def wikidata_id(uri: str) -> str | None:
    """``Q42`` of ``http://www.wikidata.org/entity/Q42`` (or of ``Q42``); None unless an item id."""
    qid = uri.strip().rstrip("/").rsplit("/", 1)[-1]
    return qid if WIKIDATA_ITEM.fullmatch(qid) else None


def _failure(batch: list[EntityRef], error: FetchError) -> LookupResult:
    status = "unreachable" if error.unreachable else "failed"
    return LookupResult(outcomes=[(entity.id, status, error.reason) for entity in batch])


def _json(body: bytes, what: str) -> dict:
    """The JSON object in ``body``; :class:`FetchError` for anything else."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise FetchError(f"malformed JSON from {what}: {type(error).__name__}: {str(error)[:200]}") from None
    return _object(payload, f"malformed JSON from {what}")


def _object(value, where: str) -> dict:
    """``value`` if it is a JSON object; :class:`FetchError` naming ``where`` otherwise."""
    if not isinstance(value, dict):
        raise FetchError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise FetchError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _text(value, where: str) -> str:
    """``value`` if it is a string of valid Unicode; :class:`FetchError` otherwise."""
    if not isinstance(value, str):
        raise FetchError(f"{where}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FetchError(f"{where}: string with a lone surrogate") from None
    return value


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
        where = f"malformed SPARQL JSON from {self.endpoint}"
        results = _object(_json(response.content, self.endpoint).get("results"), f"{where}: results")
        return _list(results.get("bindings"), f"{where}: results.bindings")

    def rows(self, bindings: list, index: dict[str, list[EntityRef]], names: tuple[str, ...]
             ) -> tuple[list[tuple[EntityRef, dict[str, str | None]]], dict[int, str]]:
        """``(entity, {name: value or None})`` per row of ``bindings`` whose ``?e`` is in
        ``index``, and the entities that have a malformed row -> the reason. A row that is not
        an object or has no ``?e`` fails the whole reply (:class:`FetchError`)."""
        rows, malformed = [], {}
        for i, row in enumerate(bindings):
            where = f"malformed SPARQL JSON from {self.endpoint}: results.bindings[{i}]"
            row = _object(row, where)
            uri = self.value(row, "e", where)
            if uri is None:
                raise FetchError(f"{where}: no ?e")
            try:
                values = {name: self.value(row, name, where) for name in names}
            except FetchError as error:
                malformed.update((entity.id, error.reason) for entity in index.get(uri, []))
                continue
            rows.extend((entity, values) for entity in index.get(uri, []))
        return rows, malformed

    @staticmethod
    def value(row: dict, name: str, where: str) -> str | None:
        """The value of variable ``name`` in a result row; None when unbound."""
        if name not in row:
            return None
        return _text(_object(row[name], f"{where}.{name}").get("value"), f"{where}.{name}.value")


def _iri(uri: str) -> str:
    """``uri`` as a SPARQL IRIREF, ``<...>``, excluded characters percent-encoded."""
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
    sparql: _Sparql, batch: list[EntityRef], query_for: Callable[[str], str], names: tuple[str, ...]
) -> tuple[list[EntityRef], list[tuple[EntityRef, dict[str, str | None]]], LookupResult]:
    """Run ``query_for(values)`` (``values``: the batch's DBpedia URIs as SPARQL ``<uri>`` terms)
    and read the variables ``names`` of each row (see :meth:`_Sparql.rows`).

    Returns the entities still to judge, their rows, and the result so far: the outcomes of
    entities without a DBpedia URI, of entities with a malformed row (``failed``), and of
    every entity when the query or its reply failed.
    """
    linked, result = _split_linked(batch, "dbpedia", "DBpedia")
    if not linked:
        return [], [], result
    index = _by_uri(linked)
    try:
        bindings = sparql.select(query_for(" ".join(f"<{uri}>" for uri in index)))
        rows, malformed = sparql.rows(bindings, index, names)
    except FetchError as error:
        result.outcomes.extend(_failure(linked, error).outcomes)
        return [], [], result
    result.outcomes.extend((e.id, "failed", malformed[e.id]) for e in linked if e.id in malformed)
    return ([e for e in linked if e.id not in malformed], [(e, v) for e, v in rows if e.id not in malformed],
            result)


class DbpediaAbstracts:
    """``dbo:abstract`` in one language, many entities per SPARQL query."""

    name = "dbpedia-abstract"

    def __init__(self, client: HttpClient, endpoint: str, language: str, batch_size: int):
        self.sparql, self.language, self.batch_size = _Sparql(client, endpoint), language, batch_size

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        linked, rows, result = _select_linked(self.sparql, batch, lambda values: (
            "PREFIX dbo: <http://dbpedia.org/ontology/>\n"
            f"SELECT ?e ?abstract WHERE {{ VALUES ?e {{ {values} }}\n"
            f"  ?e dbo:abstract ?abstract FILTER(LANG(?abstract) = \"{self.language}\") }}"), ("abstract",))
        found: dict[int, str] = {}
        for entity, values in rows:
            text = (values["abstract"] or "").strip()
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
        linked, rows, result = _select_linked(self.sparql, batch, lambda values: (
            f"SELECT ?e ?p ?o WHERE {{ VALUES ?e {{ {values} }}\n"
            f"  VALUES ?p {{ {predicates} }} ?e ?p ?o\n"
            f"  FILTER(?p != <{self.SAME_AS}> || STRSTARTS(STR(?o), \"http://www.wikidata.org/entity/\")) }}"),
            ("p", "o"))
        images: dict[int, set[str]] = {}
        for entity, values in rows:
            predicate, value = values["p"], (values["o"] or "").strip()
            if predicate == self.SAME_AS and value.startswith(WIKIDATA_PREFIXES) and wikidata_id(value):
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
        ids = {entity.id: wikidata_id(entity.wikidata) for entity in linked}
        result.outcomes.extend((e.id, "missing", f"not a Wikidata item URI: {e.wikidata!r}") for e in linked
                               if ids[e.id] is None)  # the data's own value: no retry would help
        linked = [entity for entity in linked if ids[entity.id]]
        if not linked:
            return result
        query = urllib.parse.urlencode({"action": "wbgetentities", "ids": "|".join(sorted({ids[e.id] for e in linked})),
                                        "props": "claims", "format": "json"})
        try:
            entities = self._entities(_json(self.client.fetch(f"{self.api}?{query}").content, self.api))
        except FetchError as error:
            return LookupResult(outcomes=result.outcomes + _failure(linked, error).outcomes)
        redirected = {record["redirects"]["from"]: record for record in entities.values()
                      if isinstance(record, dict) and isinstance(record.get("redirects"), dict)
                      and isinstance(record["redirects"].get("from"), str)}
        for entity in linked:
            qid = ids[entity.id]
            try:
                record = entities.get(qid, redirected.get(qid))
                if record is None:
                    raise FetchError(f"malformed Wikidata JSON from {self.api}: no entities.{qid} in the reply")
                record = _object(record, f"malformed Wikidata JSON from {self.api}: entities.{qid}")
                if "missing" in record:
                    result.outcomes.append((entity.id, "missing", f"Wikidata has no entity {qid}"))
                    continue
                files = self._p18_files(record, f"malformed Wikidata JSON from {self.api}: entities.{qid}")
            except FetchError as error:
                result.outcomes.append((entity.id, "failed", error.reason))
                continue
            result.candidates.extend((entity.id, commons_url(name, self.commons_base, self.width), self.priority + i)
                                     for i, name in enumerate(files))
            result.outcomes.append((entity.id, "done", None) if files else (entity.id, "missing", "no P18 claim"))
        return result

    def _entities(self, payload: dict) -> dict:
        """The ``entities`` object of a ``wbgetentities`` reply (an id that redirects may be
        answered under its target's id, with ``redirects.from``); an API error is a FetchError."""
        if "entities" not in payload and isinstance(payload.get("error"), dict):
            error = payload["error"]
            raise FetchError(f"Wikidata API error from {self.api}: {str(error.get('code'))[:100]}: "
                             f"{str(error.get('info'))[:300]}")
        return _object(payload.get("entities"), f"malformed Wikidata JSON from {self.api}: entities")

    @staticmethod
    def _p18_files(record: dict, where: str) -> list[str]:
        """P18 file names, preferred-rank claims first, deprecated ones and claims without a
        value (``somevalue``/``novalue``) dropped; FetchError for a malformed record."""
        claims = record.get("claims", {})
        if claims == []:  # the API writes an empty claim map as a list
            return []
        claims = _list(_object(claims, f"{where}.claims").get("P18", []), f"{where}.claims.P18")
        ranked = []
        for i, claim in enumerate(claims):
            here = f"{where}.claims.P18[{i}]"
            claim = _object(claim, here)
            snak = _object(claim.get("mainsnak"), f"{here}.mainsnak")
            if snak.get("snaktype", "value") != "value" or claim.get("rank") == "deprecated":
                continue
            value = _text(_object(snak.get("datavalue"), f"{here}.mainsnak.datavalue").get("value"),
                          f"{here}.mainsnak.datavalue.value").strip()
            if value:
                ranked.append((claim.get("rank") != "preferred", value))
        return list(dict.fromkeys(value for _, value in sorted(ranked, key=lambda pair: pair[0])))


class LocalFolder:
    """Images in a folder, matched to entities by :func:`file_names`."""

    name = "local-folder"

    def __init__(self, folder: Path, priority: int):
        if not folder.is_dir():
            raise DataError(folder, "image folder not found")
        self.folder, self.root, self.priority = folder, folder.resolve(), priority
        self.files: dict[str, list[Path]] = {}  # name -> resolved paths inside the folder
        self.refused: dict[str, list[str]] = {}  # name -> why an entry was refused
        try:
            entries = sorted(folder.iterdir())
        except OSError as error:
            raise DataError(folder, f"cannot list the image folder: {error.strerror or error}") from None
        for path in entries:
            if path.is_dir():
                self._scan_subfolder(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                self._add(path.stem, path)
        self.batch_size = 1 << 30  # no network: one batch

    def _inside(self, path: Path) -> Path | str:
        """``path`` resolved, if it stays inside the folder; else why it is refused."""
        shown = path.relative_to(self.folder)
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as error:  # broken link, symlink loop
            return f"{shown}: cannot resolve ({type(error).__name__})"
        if not target.is_relative_to(self.root):
            return f"{shown}: refused, a symlink that leads out of the folder"
        return target

    def _add(self, name: str, path: Path) -> None:
        target = self._inside(path)
        if isinstance(target, Path) and not target.is_file():
            target = f"{path.relative_to(self.folder)}: refused, not a regular file"
        if isinstance(target, str):
            self.refused.setdefault(name, []).append(target)
        else:
            self.files.setdefault(name, []).append(target)

    def _scan_subfolder(self, path: Path) -> None:
        inside = self._inside(path)
        try:
            entries = sorted(path.iterdir()) if isinstance(inside, Path) else []
        except OSError as error:
            inside = f"{path.relative_to(self.folder)}: cannot list ({error.strerror or type(error).__name__})"
        if isinstance(inside, str):
            self.refused.setdefault(path.name, []).append(inside)
        for entry in entries:
            if entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.is_dir():
                self._add(path.name, entry)

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        result = LookupResult()
        for entity in batch:
            names = file_names(entity.key)
            paths = [path for name in names for path in self.files.get(name, [])]
            refused = [reason for name in names for reason in self.refused.get(name, [])]
            result.candidates.extend((entity.id, str(path), self.priority + i) for i, path in enumerate(paths))
            result.outcomes.append((entity.id, "done", None) if paths else
                                   (entity.id, "failed", "; ".join(refused)) if refused else
                                   (entity.id, "missing", "no file"))
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
        unusable: dict[int, str] = {}  # entity -> why one of its image paths cannot be used
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
                try:
                    location = image if is_url else str((self.path.parent / image).resolve())
                except (OSError, RuntimeError, ValueError) as error:  # symlink loop, NUL byte, ...
                    unusable[entity] = f"image path {image!r} of {self.path.name} unusable: {error}"
                    continue
                result.candidates.append((entity, location, self.priority + position))
        result.outcomes.extend((e.id, "failed", unusable[e.id]) if e.id in unusable else
                               (e.id, "done", None) if e.id in found else (e.id, "missing", "no CSV row")
                               for e in batch)
        return result
