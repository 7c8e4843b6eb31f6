"""Import a benchmark: fetch and verify its files, parse them, check counts, report data
defects, optionally drop leaked validation triples, and write the canonical directory
(format in :mod:`pipeline.graph`) atomically."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_json
from pipeline.data.fetch import DEFAULT_SOURCE_URL, fetch_files
from pipeline.data.manifest import Manifest
from pipeline.data.readers import LAYOUTS, RawDataset
from pipeline.errors import DataError
from pipeline.graph import SPLITS, TRIPLE_COLUMNS, category_file


def triple_keys(triples: np.ndarray, num_entities: int, num_relations: int) -> np.ndarray:
    """One int64 key per triple ``[N, 3]``: ``(h * R + r) * E + t``."""
    return (triples[:, 0] * num_relations + triples[:, 1]) * num_entities + triples[:, 2]


def raw_counts(raw: RawDataset) -> dict[str, int]:
    counts = {"entities": len(raw.entities), "relations": len(raw.relations)}
    counts.update({name: len(t) for name, t in raw.splits.items()})
    counts.update({f"test_{c}": len(t) for c, t in raw.categories.items()})
    return counts


def check_counts(manifest: Manifest, counts: dict[str, int]) -> None:
    wrong = [f"{k}: expected {v}, found {counts.get(k)}" for k, v in manifest.expected.items() if counts.get(k) != v]
    if wrong:
        raise DataError(manifest.name, "counts differ from the manifest: " + "; ".join(wrong))


def find_defects(raw: RawDataset, manifest: Manifest) -> list[dict]:
    """Duplicates, overlaps between splits, unseen entities, category coverage, and counts
    that differ from the paper's Table 1."""
    E, R = len(raw.entities), len(raw.relations)
    keys = {name: triple_keys(t, E, R) for name, t in raw.splits.items()}
    defects = list(raw.defects)

    def add(kind: str, file: str, count: int, detail: str) -> None:
        if count:
            defects.append({"kind": kind, "file": file, "count": int(count), "detail": detail})

    for name, k in keys.items():
        add("duplicate_triples", name, len(k) - len(np.unique(k)), f"{name} lines that repeat an earlier {name} line")
    for a, b in (("valid", "train"), ("test", "train"), ("valid", "test")):
        add(f"{a}_in_{b}", a, np.isin(keys[a], keys[b]).sum(), f"{a} lines that are also {b} triples")
    seen = np.union1d(raw.splits["train"][:, 0], raw.splits["train"][:, 2])
    for name in ("valid", "test"):
        ents = np.union1d(raw.splits[name][:, 0], raw.splits[name][:, 2])
        add("entities_unseen_in_train", name, np.setdiff1d(ents, seen).size, f"entities of {name} absent from train")
    category_keys = np.concatenate([triple_keys(t, E, R) for t in raw.categories.values()])
    add("category_triples_not_in_test", "test_category_*", (~np.isin(category_keys, keys["test"])).sum(),
        "relation-category lines that are not test triples")
    add("test_triples_without_category", "test", (~np.isin(keys["test"], category_keys)).sum(),
        "test lines in no relation-category file")
    counts = raw_counts(raw)
    for key, value in manifest.paper.items():
        if counts.get(key) != value:
            add("count_differs_from_paper", key, abs(counts.get(key, 0) - value), f"{key}: paper's Table 1 says {value}, the files hold {counts.get(key)}")
    return defects


def drop_leaked_valid(raw: RawDataset) -> dict:
    """Remove valid lines that are train or test triples, and repeated valid lines."""
    E, R = len(raw.entities), len(raw.relations)
    valid = raw.splits["valid"]
    keys = triple_keys(valid, E, R)
    in_train = np.isin(keys, triple_keys(raw.splits["train"], E, R))
    in_test = np.isin(keys, triple_keys(raw.splits["test"], E, R)) & ~in_train
    _, first = np.unique(keys, return_index=True)
    repeated = np.ones(len(keys), dtype=bool)
    repeated[first] = False
    repeated &= ~(in_train | in_test)
    keep = ~(in_train | in_test | repeated)
    raw.splits["valid"] = valid[keep]
    return {"applied": True, "valid_before": len(valid), "dropped_train_triples": int(in_train.sum()),
            "dropped_test_triples": int(in_test.sum()), "dropped_repeats": int(repeated.sum()),
            "valid_after": int(keep.sum())}


def _write_triples(path: Path, triples: np.ndarray) -> None:
    pd.DataFrame(triples, columns=TRIPLE_COLUMNS).to_parquet(path, index=False)


def import_dataset(
    manifest: Manifest,
    out: str | Path,
    mirror: str | Path | None = None,
    url_template: str = DEFAULT_SOURCE_URL,
    timeout: float = 30.0,
    drop_leaked: bool = True,
    embedded: str | Path | None = None,
) -> dict:
    """Build the canonical directory ``out`` for ``manifest``; returns the report.

    The raw files come from ``mirror`` if given, else from the xz-compressed copy in
    ``embedded`` if given, else from the pinned sources (see :func:`fetch_files`).
    Nothing is written unless every checksum, line and count is right; ``out`` is replaced
    atomically, so a failed run leaves no partial directory.
    """
    if manifest.layout not in LAYOUTS:
        raise DataError(manifest.name, f"unknown layout {manifest.layout!r}; valid: {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory(prefix=f"mmrns-{manifest.name}-") as scratch:
        mirror = Path(mirror) if mirror else None
        embedded = Path(embedded) if embedded and not mirror else None
        files = fetch_files(manifest, Path(scratch), mirror, url_template, timeout, embedded)
        try:
            raw = LAYOUTS[manifest.layout](files)
        except DataError as error:
            if mirror:
                raise
            # Name the pinned source, not the scratch copy that is about to be deleted.
            source = manifest.files[Path(error.path).name]
            raise DataError(f"{source.repo}@{source.commit}:{source.path}", error.problem, error.line, error.content) from None
    counts = raw_counts(raw)
    check_counts(manifest, counts)
    report = {
        "dataset": manifest.name,
        "title": manifest.title,
        "source": "mirror" if mirror else "embedded" if embedded else "network",
        "raw_counts": counts,
        "paper_counts": manifest.paper,
        "defects": find_defects(raw, manifest),
        "valid_cleaning": drop_leaked_valid(raw) if drop_leaked else {"applied": False},
    }
    report["counts"] = raw_counts(raw)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        raw.entities.to_parquet(tmp / "entities.parquet", index=False)
        raw.relations.to_parquet(tmp / "relations.parquet", index=False)
        for name in SPLITS:
            _write_triples(tmp / f"{name}.parquet", raw.splits[name])
        for category, triples in raw.categories.items():
            _write_triples(tmp / category_file(category), triples)
        write_json(tmp / "report.json", report)
    return report
