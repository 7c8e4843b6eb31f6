"""The feature cache: layout, loader, reuse, partial recompute, invalidation, atomic resume."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.features import load_features
from pipeline.features.cache import EncodedBatch, content_key, update_cache


class CountingEncoder:
    """Features ``entity + key digit`` per entity; records which entities it was asked for."""

    def __init__(self, keys: list[str], batch_size: int = 2, fail_after: int | None = None, unreadable: frozenset = frozenset()):
        self.keys, self.batch_size, self.fail_after, self.unreadable = keys, batch_size, fail_after, unreadable
        self.encoded: list[int] = []

    def __call__(self, todo: np.ndarray):
        for start in range(0, len(todo), self.batch_size):
            if self.fail_after is not None and len(self.encoded) >= self.fail_after:
                raise RuntimeError("simulated crash")
            entities = todo[start : start + self.batch_size]
            self.encoded.extend(entities.tolist())
            ok = np.array([entity not in self.unreadable for entity in entities])
            values = np.stack([np.full((2, 3), entity + 0.5 * (self.keys[entity] == "b")) for entity in entities]) * ok[:, None, None]
            yield EncodedBatch(
                entities=entities,
                values=values,
                has_feature=ok,
                counts=ok.astype(np.int32) * 2,
                failures=[None if good else "unreadable image" for good in ok],
                reusable=ok,
            )


def build(directory, keys, config=None, dtype="float32", checkpoint_seconds=600.0, **encoder_options):
    encoder = CountingEncoder(keys, **encoder_options)
    report = update_cache(directory, keys, config or {"model": "m1"}, (2, 3), dtype, encoder, checkpoint_seconds)
    return encoder, report


def test_loader_returns_memory_map_in_entity_order(tmp_path):
    keys = ["a"] * 5
    encoder, report = build(tmp_path / "cache", keys, dtype="float16", unreadable=frozenset({3}))
    features = load_features(tmp_path / "cache")
    assert isinstance(features.values.stored, np.memmap) and features.values.dtype == np.float16
    assert np.load(tmp_path / "cache" / "features.npy").shape == (4, 2, 3)  # entity 3 has no feature: not stored
    assert features.values.shape == (5, 2, 3)
    np.testing.assert_array_equal(features.values[:, 0, 0], [0, 1, 2, 0, 4])
    np.testing.assert_array_equal(features.mask, [True, True, True, False, True])
    np.testing.assert_array_equal(features.counts, [2, 2, 2, 0, 2])
    assert features.meta["config"] == {"model": "m1"} and features.meta["dtype"] == "float16"
    index = pd.read_parquet(tmp_path / "cache" / "index.parquet")
    assert index.loc[3, "failure"] == "unreadable image" and pd.isna(index.loc[0, "failure"])
    assert report.encoded == 5 and report.invalidated


def test_unchanged_inputs_recompute_nothing(tmp_path):
    keys = [content_key([f"s{i}"]) for i in range(4)]
    build(tmp_path / "cache", keys)
    encoder, report = build(tmp_path / "cache", keys)
    assert encoder.encoded == [] and report.reused == 4 and not report.invalidated


def test_new_and_changed_entities_recompute_only_their_rows(tmp_path):
    build(tmp_path / "cache", ["a"] * 4)
    encoder, report = build(tmp_path / "cache", ["a", "b", "a", "a", "a"])
    assert sorted(encoder.encoded) == [1, 4] and report.reused == 3
    values = load_features(tmp_path / "cache").values
    np.testing.assert_array_equal(values[:, 0, 0], [0, 1.5, 2, 3, 4])


def test_rows_with_read_errors_are_retried(tmp_path):
    build(tmp_path / "cache", ["a"] * 4, unreadable=frozenset({2}))
    encoder, _ = build(tmp_path / "cache", ["a"] * 4)
    assert encoder.encoded == [2]
    assert load_features(tmp_path / "cache").mask.all()


@pytest.mark.parametrize("change", [{"config": {"model": "m2"}}, {"dtype": "float16"}])
def test_config_or_dtype_change_recomputes_all(tmp_path, change):
    build(tmp_path / "cache", ["a"] * 4)
    encoder, report = build(tmp_path / "cache", ["a"] * 4, **change)
    assert sorted(encoder.encoded) == [0, 1, 2, 3] and report.invalidated


def test_crash_keeps_previous_cache(tmp_path):
    build(tmp_path / "cache", ["a"] * 4)
    before = np.array(load_features(tmp_path / "cache").values)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tmp_path / "cache", ["b"] * 4, fail_after=2)
    after = load_features(tmp_path / "cache")
    np.testing.assert_array_equal(after.values, before)
    assert [path.name for path in tmp_path.iterdir()] == ["cache"]


def test_checkpoint_of_crashed_run_is_refused_then_resumed(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tmp_path / "cache", ["a"] * 6, fail_after=4, checkpoint_seconds=0.0)
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["complete"] is False
    with pytest.raises(DataError, match="did not finish"):
        load_features(tmp_path / "cache")
    encoder, report = build(tmp_path / "cache", ["a"] * 6)
    assert encoder.encoded == [4, 5] and report.reused == 4
    np.testing.assert_array_equal(load_features(tmp_path / "cache").values[:, 0, 0], np.arange(6))


def test_missing_files_and_bad_dtype(tmp_path):
    with pytest.raises(DataError, match="features.npy"):
        load_features(tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        build(tmp_path / "cache", ["a"], dtype="int8")


def test_no_feature_stores_no_rows_and_loads_as_zeros(tmp_path):
    from pipeline.samplers.mmrns.sampler import _feature_tensors

    keys = ["a"] * 1000
    build(tmp_path / "cache", keys, dtype="float16", batch_size=250, unreadable=frozenset(range(1000)))
    assert (tmp_path / "cache" / "features.npy").stat().st_size <= 128  # a header: dense zeros would be 12 kB
    features = load_features(tmp_path / "cache")
    assert features.values.shape == (1000, 2, 3) and not features.mask.any()
    assert not features.values[[0, 999]].any()
    values, mask = _feature_tensors(features, 1000, (24, 383))
    assert values.shape == (1000, 2, 3) and values.stride(0) == 0 and not mask.any()  # a view: no memory


def test_cache_with_stored_zero_rows_is_rewritten_compact(tmp_path):
    build(tmp_path / "cache", ["a"] * 4, unreadable=frozenset({1, 2}))
    index = pd.read_parquet(tmp_path / "cache" / "index.parquet")
    dense = np.zeros((4, 2, 3), np.float32)
    dense[[0, 3]] = np.load(tmp_path / "cache" / "features.npy")
    np.save(tmp_path / "cache" / "features.npy", dense)  # the layout before compact storage
    index.assign(row=np.arange(4)).to_parquet(tmp_path / "cache" / "index.parquet", index=False)
    np.testing.assert_array_equal(load_features(tmp_path / "cache").values, dense)
    encoder, report = build(tmp_path / "cache", ["a"] * 4, unreadable=frozenset({1, 2}))
    assert encoder.encoded == [1, 2] and np.load(tmp_path / "cache" / "features.npy").shape == (2, 2, 3)
    np.testing.assert_array_equal(load_features(tmp_path / "cache").values, dense)


def damage(path, how):
    """Damage a real cache file: cut it to ``how`` bytes (negative: drop that many) or write junk."""
    data = path.read_bytes()
    path.write_bytes(b"\x00junk{" if how == "junk" else data[:how])


@pytest.mark.parametrize("name, how", [("meta.json", "junk"), ("meta.json", 0), ("index.parquet", -40),
                                       ("index.parquet", "junk"), ("features.npy", 0), ("features.npy", 20)])
def test_unreadable_cache_file_is_named_then_rebuilt(tmp_path, name, how):
    keys = ["a"] * 6
    build(tmp_path / "cache", keys)
    damage(tmp_path / "cache" / name, how)
    with pytest.raises(DataError, match=rf"cache/{name}: .*; run extract-x") as error:
        load_features(tmp_path / "cache", repair="run extract-x")
    assert "\n" not in str(error.value)
    encoder, report = build(tmp_path / "cache", keys)
    assert encoder.encoded == list(range(6)) and name in report.damaged and "rebuilding" in report.damaged
    np.testing.assert_array_equal(load_features(tmp_path / "cache").values[:, 0, 0], np.arange(6))


def test_truncated_features_recompute_only_the_lost_rows(tmp_path):
    keys = ["a"] * 6
    build(tmp_path / "cache", keys, unreadable=frozenset({1}))  # stored rows: entities 0, 2, 3, 4, 5
    path = tmp_path / "cache" / "features.npy"
    path.write_bytes(path.read_bytes()[: -(3 * 2 * 3 * 4 - 5)])  # drops entity 5's row and part of 4's and 3's
    with pytest.raises(DataError, match="features.npy: truncated: 2 of 5 rows"):
        load_features(tmp_path / "cache")
    encoder, report = build(tmp_path / "cache", keys, unreadable=frozenset({1}))
    assert encoder.encoded == [1, 3, 4, 5] and "recomputing 3 entities" in report.damaged
    np.testing.assert_array_equal(load_features(tmp_path / "cache").values[:, 0, 0], [0, 0, 2, 3, 4, 5])
