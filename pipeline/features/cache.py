"""Per-modality feature caches: a memory-mappable ``.npy`` array plus a Parquet index.

A cache directory holds three files:

- ``features.npy``: ``[E, T, D]`` float16 or float32, row ``i`` = entity ``i`` (entity-id
  order), zeros where the entity has no feature; open with ``np.load(mmap_mode="r")``;
- ``index.parquet``: one row per entity with the columns of :data:`INDEX_COLUMNS`:
  ``entity`` int64, ``row`` int64, ``has_feature`` bool (the mask), ``count`` int32
  (sentences or images used), ``failure`` string (why there is no feature, or which inputs
  were skipped; null when all inputs were used), ``content_key`` string (hash of the
  inputs the row was computed from), ``reusable`` bool (the row may be reused on the next
  run if its content key is unchanged; false after a read error or for a row not yet
  computed in an interrupted run);
- ``meta.json``: the model identity and preprocessing parameters (``config``), the storage
  ``dtype``, the ``shape`` and ``complete`` (false for a checkpoint of an interrupted run).

:func:`update_cache` recomputes only what changed: a different ``config`` (model,
pooling, preprocessing), dtype or item shape invalidates every row; otherwise a row is
reused when its content key is unchanged and it is reusable. The whole directory is
replaced atomically, at the end and at periodic checkpoints, so a crash leaves either the
previous cache or a checkpoint marked incomplete.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError, DataError

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"
INDEX_COLUMNS = ("entity", "row", "has_feature", "count", "failure", "content_key", "reusable")
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Features:
    """A loaded feature cache of ``E`` entities."""

    values: np.ndarray  # [E, T, D] read-only memory map, zeros where mask is False
    mask: np.ndarray  # [E] bool: the entity has this modality
    counts: np.ndarray  # [E] int32: sentences or images the feature was computed from
    meta: dict[str, Any]  # model identity, preprocessing parameters, dtype, shape


@dataclass(frozen=True)
class EncodedBatch:
    """Features of ``n`` entities, as an encoder yields them."""

    entities: np.ndarray  # [n] int64 entity ids
    values: np.ndarray  # [n, T, D] zeros where has_feature is False
    has_feature: np.ndarray  # [n] bool
    counts: np.ndarray  # [n] int: inputs used
    failures: Sequence[str | None]  # [n] reason for a missing feature or skipped inputs
    reusable: np.ndarray  # [n] bool: False when a retry could give another result


@dataclass(frozen=True)
class CacheReport:
    """What :func:`update_cache` did."""

    num_entities: int
    encoded: int  # rows recomputed in this run
    reused: int  # rows taken from the previous cache
    invalidated: bool  # no usable previous cache: none, or its config, dtype or shape differ


def load_features(directory: str | Path) -> Features:
    """Open the cache in ``directory``; ``values`` is memory-mapped, not read into RAM.

    Raises DataError when a file is missing, the run that wrote it did not finish, or the
    index does not match the array.
    """
    directory = Path(directory)
    for name in (FEATURES_FILE, INDEX_FILE, META_FILE):
        if not (directory / name).is_file():
            raise DataError(directory / name, "missing feature cache file; run the extract stage")
    meta = json.loads((directory / META_FILE).read_text())
    if not meta.get("complete", False):
        raise DataError(directory / META_FILE, "the run that wrote this cache did not finish; rerun the extract stage")
    values = np.load(directory / FEATURES_FILE, mmap_mode="r")
    index = pd.read_parquet(directory / INDEX_FILE).sort_values("entity")
    num_entities = values.shape[0]
    if len(index) != num_entities or not np.array_equal(index["entity"].to_numpy(), np.arange(num_entities)):
        raise DataError(directory / INDEX_FILE, f"index does not list entities 0..{num_entities - 1} of {FEATURES_FILE}")
    if not np.array_equal(index["row"].to_numpy(), index["entity"].to_numpy()):
        raise DataError(directory / INDEX_FILE, "rows are not in entity-id order")
    return Features(
        values=values,
        mask=index["has_feature"].to_numpy(dtype=bool),
        counts=index["count"].to_numpy(dtype=np.int32),
        meta=meta,
    )


def content_key(payload: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``payload`` (an entity's inputs)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _previous(
    directory: Path, config: dict, dtype: str, item_shape: tuple[int, int]
) -> tuple[np.ndarray, pd.DataFrame, bool] | None:
    """The previous cache's (values memory map, index, complete) if built with the same setup."""
    if not all((directory / name).is_file() for name in (FEATURES_FILE, INDEX_FILE, META_FILE)):
        return None
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("config") != config or meta.get("dtype") != dtype or tuple(meta.get("shape", ())[1:]) != item_shape:
        return None
    values = np.load(directory / FEATURES_FILE, mmap_mode="r")
    return values, pd.read_parquet(directory / INDEX_FILE), bool(meta.get("complete", False))


def update_cache(
    directory: str | Path,
    keys: Sequence[str],
    config: dict[str, Any],
    item_shape: tuple[int, int],
    dtype: str,
    encode: Callable[[np.ndarray], Iterator[EncodedBatch]],
    checkpoint_seconds: float = 600.0,
) -> CacheReport:
    """Bring the cache in ``directory`` up to date for entities ``0..len(keys)-1``.

    ``keys[i]`` is the content key of entity ``i``'s inputs and ``config`` the JSON-able
    model identity and preprocessing parameters. ``encode(entity_ids [n])`` is called once
    with the entities whose rows must be recomputed and yields :class:`EncodedBatch` es
    covering exactly them, with values of shape ``[*, *item_shape]``. The directory is
    written atomically after the last batch and, while encoding, every
    ``checkpoint_seconds`` (as an incomplete cache whose pending rows are not reusable).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    directory = Path(directory)
    num_entities = len(keys)
    item_shape = tuple(int(size) for size in item_shape)
    values = np.zeros((num_entities, *item_shape), dtype=dtype)
    has_feature = np.zeros(num_entities, dtype=bool)
    counts = np.zeros(num_entities, dtype=np.int32)
    failures = np.full(num_entities, None, dtype=object)
    reusable = np.zeros(num_entities, dtype=bool)
    previous = _previous(directory, config, dtype, item_shape)
    up_to_date, invalidated = False, previous is None
    if previous is not None:
        old_values, old_index, previous_complete = previous
        up_to_date = previous_complete and len(old_index) == num_entities
        old_index = old_index[old_index["entity"] < num_entities]
        entities = old_index["entity"].to_numpy()
        same = old_index["reusable"].to_numpy(dtype=bool) & (
            old_index["content_key"].to_numpy(dtype=object) == np.asarray(keys, dtype=object)[entities]
        )
        reused = entities[same]
        values[reused] = old_values[old_index["row"].to_numpy()[same]]
        has_feature[reused] = old_index["has_feature"].to_numpy(dtype=bool)[same]
        counts[reused] = old_index["count"].to_numpy()[same]
        failures[reused] = old_index["failure"].astype(object).where(old_index["failure"].notna(), None).to_numpy()[same]
        reusable[reused] = True
        del old_values, previous
    todo = np.flatnonzero(~reusable)
    report = CacheReport(num_entities, encoded=len(todo), reused=num_entities - len(todo), invalidated=invalidated)

    def commit(complete: bool) -> None:
        index = pd.DataFrame(
            {
                "entity": np.arange(num_entities, dtype=np.int64),
                "row": np.arange(num_entities, dtype=np.int64),
                "has_feature": has_feature,
                "count": counts,
                "failure": pd.array(failures, dtype="string"),
                "content_key": pd.array(list(keys), dtype="string"),
                "reusable": reusable,
            }
        )
        meta = {"config": config, "dtype": dtype, "shape": [num_entities, *item_shape], "complete": complete}
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            np.save(tmp / FEATURES_FILE, values)
            index.to_parquet(tmp / INDEX_FILE, index=False)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    if len(todo) == 0 and up_to_date:
        return report
    last_commit = time.monotonic()
    done = np.zeros(num_entities, dtype=bool)
    for batch in encode(todo):
        if batch.values.shape[1:] != item_shape:
            raise ValueError(f"encoder returned items of shape {batch.values.shape[1:]}, expected {item_shape}")
        values[batch.entities] = batch.values
        has_feature[batch.entities] = batch.has_feature
        counts[batch.entities] = batch.counts
        failures[batch.entities] = list(batch.failures)
        reusable[batch.entities] = batch.reusable
        done[batch.entities] = True
        if time.monotonic() - last_commit > checkpoint_seconds:
            commit(complete=False)
            last_commit = time.monotonic()
    missing = todo[~done[todo]]
    if len(missing):
        raise ValueError(f"encoder skipped {len(missing)} entities, e.g. {missing[:5].tolist()}")
    commit(complete=True)
    return report
