"""Readers of the raw benchmark formats. Each layout turns the raw files of one benchmark
into the same :class:`RawDataset`; every malformed line is a DataError naming file, line
number and content."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.graph import CATEGORIES

Row = tuple[int, str, list[str]]  # (line number, line, fields)
DBPEDIA_RESOURCE = "http://dbpedia.org/resource/"


@dataclass
class RawDataset:
    """A benchmark as parsed, before checks and cleaning."""

    entities: pd.DataFrame  # id, key, label, dbpedia, wikidata, yago, freebase (+ layout extras)
    relations: pd.DataFrame  # id, key, label (+ layout extras)
    splits: dict[str, np.ndarray]  # train/valid/test -> [N, 3] (head, relation, tail)
    categories: dict[str, np.ndarray]  # 1-1/1-n/n-1/n-n -> [N, 3]
    defects: list[dict] = field(default_factory=list)


def read_rows(path: Path, width: int, sep: str | None = None, count_line: bool = False) -> list[Row]:
    """Split ``path`` into rows of exactly ``width`` fields. ``count_line``: the first line
    holds the number of rows that follow, and is checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, f"not UTF-8 text ({error})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    declared, start = None, 0
    if count_line:
        if not lines:
            raise DataError(path, "empty file, expected a count line", 1)
        declared = _int(lines[0].strip(), path, 1, lines[0])
        start = 1
    rows = []
    for number, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        fields = line.split(sep) if sep is not None else line.split()
        if len(fields) != width:
            raise DataError(path, f"expected {width} fields, found {len(fields)}", number, line)
        rows.append((number, line, fields))
    if declared is not None and declared != len(rows):
        raise DataError(path, f"count line says {declared} rows, file holds {len(rows)}", 1, lines[0])
    return rows


def _int(text: str, path: Path, number: int, line: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(path, f"{text!r} is not an integer", number, line) from None


def read_id_table(path: Path, key_field: int, id_field: int, width: int, sep: str | None = None,
                  count_line: bool = False, check_field: int | None = None) -> list[str]:
    """Keys indexed by id from an ``X2id`` file; ids must be exactly 0..n-1.
    ``check_field``: a second id column that must equal the first."""
    rows = read_rows(path, width, sep, count_line)
    keys: list[str | None] = [None] * len(rows)
    for number, line, fields in rows:
        index = _int(fields[id_field], path, number, line)
        if check_field is not None and _int(fields[check_field], path, number, line) != index:
            raise DataError(path, "the two id columns differ", number, line)
        if not 0 <= index < len(rows):
            raise DataError(path, f"id {index} out of range 0..{len(rows) - 1}", number, line)
        if keys[index] is not None:
            raise DataError(path, f"id {index} appears twice", number, line)
        keys[index] = fields[key_field]
    return keys  # type: ignore[return-value]


def read_triples(path: Path, order: str, sep: str | None, count_line: bool,
                 num_entities: int, num_relations: int) -> np.ndarray:
    """Triples ``[N, 3]`` (head, relation, tail) from a file whose columns follow ``order``
    (a permutation of ``"hrt"``); ids are range-checked."""
    rows = read_rows(path, 3, sep, count_line)
    columns = {name: i for i, name in enumerate(order)}
    triples = np.empty((len(rows), 3), dtype=np.int64)
    for i, (number, line, fields) in enumerate(rows):
        h, r, t = (_int(fields[columns[c]], path, number, line) for c in "hrt")
        if not (0 <= h < num_entities and 0 <= t < num_entities):
            raise DataError(path, f"entity id out of range 0..{num_entities - 1}", number, line)
        if not 0 <= r < num_relations:
            raise DataError(path, f"relation id out of range 0..{num_relations - 1}", number, line)
        triples[i] = (h, r, t)
    return triples


def label_of_uri(uri: str) -> str:
    """Human label from a URI's local name: ``.../Linda_Darnell`` -> ``Linda Darnell``."""
    local = uri.rstrip("/").rsplit("#", 1)[-1].rsplit("/", 1)[-1]
    return unquote(local).replace("_", " ")


def _entities(keys: list[str], labels: list[str], **columns: list[str | None]) -> pd.DataFrame:
    frame = pd.DataFrame({"id": np.arange(len(keys), dtype=np.int64), "key": keys, "label": labels})
    for name in ("dbpedia", "wikidata", "yago", "freebase"):
        frame[name] = pd.Series(columns.pop(name, [None] * len(keys)), dtype="string")
    for name, values in columns.items():
        frame[name] = pd.Series(values, dtype="string")
    return frame


def _relations(keys: list[str], labels: list[str], **columns: list[str | None]) -> pd.DataFrame:
    frame = pd.DataFrame({"id": np.arange(len(keys), dtype=np.int64), "key": keys, "label": labels})
    for name, values in columns.items():
        frame[name] = pd.Series(values, dtype="string")
    return frame


def _categories(files: dict[str, Path], num_entities: int, num_relations: int) -> dict[str, np.ndarray]:
    return {
        c: read_triples(files[f"test_category_{c}.txt"], "htr", None, True, num_entities, num_relations)
        for c in CATEGORIES
    }


def _strip_brackets(text: str) -> str:
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def read_mkg_w(files: dict[str, Path]) -> RawDataset:
    """MKG-W in OpenKE form: ``X2id.txt`` rows ``id key id``, triples ``head tail relation``."""
    uris = read_id_table(files["entity2id.txt"], key_field=1, id_field=0, width=3, check_field=2)
    wikidata = read_id_table(files["entity2wikidata.txt"], key_field=0, id_field=1, width=2)
    links = {fields[0]: fields[1] for _, _, fields in read_rows(files["ent_links.txt"], 2, "\t")}
    defects = []
    disagree = sum(1 for uri, wd in zip(uris, wikidata) if uri in links and links[uri] != wd)
    unlinked = sum(1 for uri in uris if uri not in links)
    if disagree or unlinked:
        defects.append({"kind": "wikidata_links_disagree", "file": "ent_links.txt",
                        "count": disagree + unlinked,
                        "detail": f"{disagree} entities map to another Wikidata item than in entity2wikidata.txt, {unlinked} are absent"})
    relation_keys = read_id_table(files["relation2id.txt"], key_field=1, id_field=0, width=3, check_field=2)
    relation_labels = [row[1] for row in read_rows(files["rel_links.txt"], 1, "\t")]
    if len(relation_labels) != len(relation_keys):
        raise DataError(files["rel_links.txt"], f"{len(relation_labels)} labels for {len(relation_keys)} relations")
    relation_wikidata = read_id_table(files["relation2wikidata.txt"], key_field=0, id_field=1, width=2, count_line=True)
    E, R = len(uris), len(relation_keys)
    splits = {s: read_triples(files[f"{s}2id.txt"], "htr", None, False, E, R) for s in ("train", "valid", "test")}
    return RawDataset(
        entities=_entities(uris, [label_of_uri(u) for u in uris], dbpedia=uris, wikidata=wikidata),
        relations=_relations(relation_keys, relation_labels, wikidata=relation_wikidata),
        splits=splits,
        categories=_categories(files, E, R),
        defects=defects,
    )


def read_db15k(files: dict[str, Path]) -> RawDataset:
    """MMKB-DB15K: ``<uri> id`` tables with a count line, triples ``head<TAB>relation<TAB>tail``,
    Freebase links (``mid <SameAs> <uri> .``) and MMKB image ids."""
    uris = [_strip_brackets(k) for k in read_id_table(files["entity2id.txt"], 0, 1, 2, count_line=True)]
    relation_uris = [_strip_brackets(k) for k in read_id_table(files["relation2id.txt"], 0, 1, 2, count_line=True)]
    index = {uri: i for i, uri in enumerate(uris)}
    freebase: list[str | None] = [None] * len(uris)
    unknown_links = 0
    for number, line, (mid, predicate, uri, dot) in read_rows(files["DB15K_SameAsLink.txt"], 4):
        if predicate != "<SameAs>" or dot != ".":
            raise DataError(files["DB15K_SameAsLink.txt"], "expected 'mid <SameAs> <uri> .'", number, line)
        position = index.get(_strip_brackets(uri))
        if position is None:
            unknown_links += 1
        else:
            freebase[position] = mid
    images: list[str | None] = [None] * len(uris)
    for _, _, (uri, image) in read_rows(files["DB15K_ImageIndex.txt"], 2, "\t"):
        position = index.get(_strip_brackets(uri))
        if position is not None:
            images[position] = image
    defects = []
    if unknown_links:
        defects.append({"kind": "links_to_unknown_entities", "file": "DB15K_SameAsLink.txt", "count": unknown_links,
                        "detail": "SameAs lines whose DBpedia URI is not an entity of entity2id.txt"})
    without_image = sum(v is None for v in images)
    if without_image:
        defects.append({"kind": "entities_without_image_id", "file": "DB15K_ImageIndex.txt", "count": without_image,
                        "detail": "entities with no MMKB image id"})
    E, R = len(uris), len(relation_uris)
    splits = {s: read_triples(files[f"{s}.txt"], "hrt", "\t", False, E, R) for s in ("train", "valid", "test")}
    return RawDataset(
        entities=_entities(uris, [label_of_uri(u) for u in uris], dbpedia=uris, freebase=freebase, mmkb_image=images),
        relations=_relations(relation_uris, [label_of_uri(u) for u in relation_uris]),
        splits=splits,
        categories=_categories(files, E, R),
        defects=defects,
    )


def read_mkg_y(files: dict[str, Path]) -> RawDataset:
    """MKG-Y: ``yago_name id`` entities (no count line), ``name id`` relations (count line),
    triples ``head<TAB>relation<TAB>tail``. YAGO names map to DBpedia by local name."""
    names = read_id_table(files["entity2id.txt"], key_field=0, id_field=1, width=2)
    relation_names = read_id_table(files["relation2id.txt"], key_field=0, id_field=1, width=2, count_line=True)
    E, R = len(names), len(relation_names)
    splits = {s: read_triples(files[f"{s}.txt"], "hrt", "\t", False, E, R) for s in ("train", "valid", "test")}
    return RawDataset(
        entities=_entities(names, [label_of_uri(n) for n in names], yago=names,
                           dbpedia=[DBPEDIA_RESOURCE + n for n in names]),
        relations=_relations(relation_names, relation_names),
        splits=splits,
        categories=_categories(files, E, R),
    )


LAYOUTS: dict[str, Callable[[dict[str, Path]], RawDataset]] = {
    "mkg-w": read_mkg_w,
    "db15k": read_db15k,
    "mkg-y": read_mkg_y,
}
