"""Per-modality feature caches: a memory-mappable ``.npy`` array plus a Parquet index.

A cache directory holds three files:

- ``features.npy``: ``[F, T, D]`` float16 or float32, the rows of the ``F`` entities that
  have a feature only (an entity without one costs no space: no image at all, no array);
  open with ``np.load(mmap_mode="r")``;
- ``index.parquet``: one row per entity with the columns of :data:`INDEX_COLUMNS`:
  ``entity`` int64, ``row`` int64 (its row in ``features.npy``, -1 without a feature),
  ``has_feature`` bool (the mask), ``count`` int32
  (sentences or images used), ``failure`` string (why there is no feature, or which inputs
  were skipped; null when all inputs were used), ``content_key`` string (hash of the
  inputs the row was computed from), ``reusable`` bool (the row may be reused on the next
  run if its content key is unchanged; false after a read error or for a row not yet
  computed in an interrupted run);
- ``meta.json``: the model identity and preprocessing parameters (``config``), the storage
  ``dtype``, the ``shape`` ``[E, T, D]`` and ``complete`` (false for a checkpoint of an
  interrupted run).

:func:`load_features` gives ``values`` as an ``[E, T, D]`` array in entity order (zeros
where the mask is False) without reading the file into memory. :func:`update_cache`
recomputes only what changed: a different ``config`` (model,
pooling, preprocessing), dtype or item shape invalidates every row; otherwise a row is
reused when its content key is unchanged and it is reusable. A damaged cache (unreadable
``meta.json`` or ``index.parquet``: rebuilt; truncated ``features.npy``: the lost rows
recomputed) is repaired and said in :attr:`CacheReport.damaged`. The whole directory is
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

    values: np.ndarray | FeatureValues  # [E, T, D], zeros where mask is False (memory map or view)
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
    damaged: str | None = None  # what was wrong with the previous cache's files, if anything


REPAIR_HINT = "rebuild it with its extract stage (python -m stages extract-text|extract-visual DATASET)"


class FeatureValues:
    """``[E, T, D]`` read-only view of the stored rows: entity ``i`` is ``stored[rows[i]]``,
    zeros where ``rows[i] < 0``. Indexing reads only the rows asked for; ``np.asarray``
    gives the dense array."""

    def __init__(self, stored: np.ndarray, rows: np.ndarray):
        self.stored, self.rows = stored, rows
        self.shape = (len(rows), *stored.shape[1:])
        self.dtype, self.ndim = stored.dtype, len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        entities = np.arange(len(self))[first]  # the entities asked for, in numpy's semantics
        if np.ndim(entities) == 0:
            return self._dense(np.array([entities]))[(0, *rest)]
        if isinstance(first, slice):
            return self._dense(entities)[(slice(None), *rest)]
        unique, inverse = np.unique(entities, return_inverse=True)
        return self._dense(unique)[(inverse.reshape(entities.shape), *rest)]

    def _dense(self, entities: np.ndarray) -> np.ndarray:
        """The dense ``[n, T, D]`` rows of ``entities [n]``."""
        rows = self.rows[entities]
        out = np.zeros((len(rows), *self.shape[1:]), self.dtype)
        have = rows >= 0
        out[have] = self.stored[rows[have]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = self[:]
        return dense if dtype is None else dense.astype(dtype)


def _open_rows(path: Path) -> tuple[np.ndarray, int]:
    """``(the complete rows of the .npy file at path as a read-only memory map, rows its header
    declares)``: fewer rows than declared when the file is truncated. Raises ValueError when
    the header itself is unreadable."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(handle)
        except Exception as error:  # noqa: BLE001 - any unreadable header is a damaged file
            raise ValueError(f"unreadable .npy header ({error})") from None
        offset = handle.tell()
    if fortran_order or len(shape) != 3 or dtype.hasobject:
        raise ValueError(f"not a C-ordered [rows, T, D] numeric array (shape {shape}, dtype {dtype})")
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    complete = min(shape[0], (path.stat().st_size - offset) // row_bytes) if row_bytes else shape[0]
    if complete == 0 or row_bytes == 0:
        return np.zeros((complete, *shape[1:]), dtype), shape[0]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(complete, *shape[1:])), shape[0]


def _read_cache(directory: Path) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray, int]:
    """``(meta, index sorted by entity, stored rows, rows declared)`` of the cache in
    ``directory``; a DataError names the first file that is missing or unreadable, or an
    index that does not match the array."""
    for name in (FEATURES_FILE, INDEX_FILE, META_FILE):
        if not (directory / name).is_file():
            raise DataError(directory / name, "missing feature cache file")
    try:
        meta = json.loads((directory / META_FILE).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list) or len(meta["shape"]) != 3:
            raise ValueError("not a cache description with a [E, T, D] shape")
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(directory / META_FILE, f"unreadable ({error})") from None
    try:
        index = pd.read_parquet(directory / INDEX_FILE)
        missing = [column for column in INDEX_COLUMNS if column not in index.columns]
        if missing:
            raise ValueError(f"missing columns {missing}")
    except Exception as error:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise DataError(directory / INDEX_FILE, f"unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    try:
        stored, declared = _open_rows(directory / FEATURES_FILE)
    except (OSError, ValueError) as error:
        raise DataError(directory / FEATURES_FILE, f"unreadable ({error})") from None
    index = index.sort_values("entity", ignore_index=True)
    rows = index["row"].to_numpy()
    num_entities = int(meta["shape"][0])
    if (
        len(index) != num_entities
        or not np.array_equal(index["entity"].to_numpy(), np.arange(num_entities))
        or rows.max(initial=-1) >= declared
        or list(stored.shape[1:]) != list(meta["shape"][1:])
        or (rows[index["has_feature"].to_numpy(dtype=bool)] < 0).any()
    ):
        raise DataError(directory / INDEX_FILE, f"does not match {FEATURES_FILE} and {META_FILE} (entities 0..{num_entities - 1}, {declared} stored rows)")
    return meta, index, stored, declared


def load_features(directory: str | Path, repair: str = REPAIR_HINT) -> Features:
    """Open the cache in ``directory``; ``values`` is memory-mapped, not read into RAM.

    Raises DataError (naming the file, and ``repair``: what rebuilds it) when a file is
    missing, unreadable or truncated, the run that wrote it did not finish, or the index
    does not match the array.
    """
    directory = Path(directory)
    try:
        meta, index, stored, declared = _read_cache(directory)
    except DataError as error:
        raise DataError(error.path, f"{error.problem}; {repair}") from None
    if len(stored) < declared:
        raise DataError(directory / FEATURES_FILE, f"truncated: {len(stored)} of {declared} rows readable; {repair}")
    if not meta.get("complete", False):
        raise DataError(directory / META_FILE, f"the run that wrote this cache did not finish; {repair}")
    rows = index["row"].to_numpy()
    identity = len(stored) == len(rows) and np.array_equal(rows, np.arange(len(rows)))
    return Features(
        values=stored if identity and isinstance(stored, np.memmap) else FeatureValues(stored, rows),
        mask=index["has_feature"].to_numpy(dtype=bool, copy=True),  # writable: torch.from_numpy warns on read-only
        counts=index["count"].to_numpy(dtype=np.int32, copy=True),
        meta=meta,
    )


def content_key(payload: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``payload`` (an entity's inputs)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _previous(
    directory: Path, config: dict, dtype: str, item_shape: tuple[int, int]
) -> tuple[np.ndarray, pd.DataFrame, bool, str | None] | None:
    """The previous cache's (stored rows, index, complete, damage) if built with the same
    setup. Rows lost to a truncated ``features.npy`` are marked not reusable (recomputed);
    an unreadable cache gives ``None`` with its damage in the DataError's text."""
    if not any((directory / name).exists() for name in (FEATURES_FILE, INDEX_FILE, META_FILE)):
        return None
    meta, index, stored, declared = _read_cache(directory)
    if meta.get("config") != config or meta.get("dtype") != dtype or tuple(meta["shape"][1:]) != item_shape:
        return None
    damage = None
    if len(stored) < declared:
        lost = index["row"].to_numpy() >= len(stored)
        index.loc[lost, "reusable"] = False
        damage = f"{directory / FEATURES_FILE}: truncated, {len(stored)} of {declared} rows readable; recomputing {int(lost.sum())} entities"
    return stored, index, bool(meta.get("complete", False)), damage


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
    try:
        previous = _previous(directory, config, dtype, item_shape)
        damaged = previous[3] if previous is not None else None
    except DataError as error:
        previous, damaged = None, f"{error}; rebuilding the whole cache"
    up_to_date, invalidated = False, previous is None
    if previous is not None:
        old_values, old_index, previous_complete, _ = previous
        # a cache written before compact storage (zero rows stored) is rewritten once
        compact = len(old_values) == int(old_index["has_feature"].sum())
        up_to_date = previous_complete and len(old_index) == num_entities and damaged is None and compact
        old_index = old_index[old_index["entity"] < num_entities]
        entities = old_index["entity"].to_numpy()
        same = old_index["reusable"].to_numpy(dtype=bool) & (
            old_index["content_key"].to_numpy(dtype=object) == np.asarray(keys, dtype=object)[entities]
        )
        reused = entities[same]
        stored_rows = old_index["row"].to_numpy()[same]
        values[reused[stored_rows >= 0]] = old_values[stored_rows[stored_rows >= 0]]
        has_feature[reused] = old_index["has_feature"].to_numpy(dtype=bool)[same]
        counts[reused] = old_index["count"].to_numpy()[same]
        failures[reused] = old_index["failure"].astype(object).where(old_index["failure"].notna(), None).to_numpy()[same]
        reusable[reused] = True
        del old_values, previous
    todo = np.flatnonzero(~reusable)
    report = CacheReport(num_entities, len(todo), num_entities - len(todo), invalidated, damaged)

    def commit(complete: bool) -> None:
        rows = np.where(has_feature, np.cumsum(has_feature) - 1, -1).astype(np.int64)
        index = pd.DataFrame(
            {
                "entity": np.arange(num_entities, dtype=np.int64),
                "row": rows,
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
            np.save(tmp / FEATURES_FILE, values[has_feature])  # rows with a feature only
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
