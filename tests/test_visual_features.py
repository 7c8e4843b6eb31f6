"""BEiT visual features: pooling, a tiny saved BEiT on real photos, cache behaviour, errors."""
from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest_features import photo_store, save_tiny_beit, tiny_beit, write_media  # noqa: F401  (fixtures)
from pipeline.errors import ConfigError
from pipeline.features import load_features
from pipeline.features.visual import BeitEncoder, VisualSettings, extract_visual, pool_tokens, pooled_shape
from pipeline.media import image_path
from stages import app
from stages import extract_visual as extract_visual_stage  # noqa: F401  (registers the command)


def settings(model, **changes) -> VisualSettings:
    values = dict(model=str(model), hidden_shape=(197, 32), kernel=(9, 3), stride=(8, 2), image_mode="first", batch_size=3, dtype="float32", seed=0)
    return VisualSettings(**{**values, **changes})


@pytest.fixture
def count_images(monkeypatch):
    """Counts the images that go through BEiT (wraps the real BeitEncoder.pooled)."""
    counter = {"images": 0}
    pooled = BeitEncoder.pooled

    def counting(self, images):
        counter["images"] += len(images)
        return pooled(self, images)

    monkeypatch.setattr(BeitEncoder, "pooled", counting)
    return counter


def test_beit_base_hidden_state_pools_to_24_by_383():
    hidden = torch.randn(2, 197, 768)
    pooled = pool_tokens(hidden, (9, 3), (8, 2))
    assert pooled.shape == (2, 24, 383) and pooled_shape((197, 768), (9, 3), (8, 2)) == (24, 383)
    torch.testing.assert_close(pooled[1, 5, 7], hidden[1, 40:49, 14:17].mean())


def test_pooling_that_does_not_fit_is_a_config_error():
    with pytest.raises(ConfigError, match="kernel"):
        settings("unused", kernel=(9, 40))


def test_tiny_beit_on_real_photos(tiny_beit, photo_store, tmp_path):
    store, digests = photo_store
    hashes = [[digests["astronaut"]], [], [digests["coffee"], digests["chelsea"]], [digests["rocket"]]]
    report = extract_visual(hashes, store, tmp_path / "visual", settings(tiny_beit))
    features = load_features(tmp_path / "visual")
    assert features.values.shape == (4, *pooled_shape((197, 32), (9, 3), (8, 2))) == (4, 24, 15)
    np.testing.assert_array_equal(features.mask, [True, False, True, True])
    np.testing.assert_array_equal(features.counts, [1, 0, 1, 1])
    assert report.encoded == 4
    assert not features.values[1].any() and all(np.abs(features.values[i]).sum() > 0 for i in (0, 2, 3))
    assert not np.allclose(features.values[0], features.values[3])
    assert features.meta["config"]["model"]["name"] == str(tiny_beit) and len(features.meta["config"]["model"]["hash"]) == 64
    assert features.meta["config"]["preprocessing"]["size"] == {"height": 224, "width": 224}
    index = pd.read_parquet(tmp_path / "visual" / "index.parquet")
    assert index.loc[1, "failure"] == "no image"


def test_mean_mode_averages_pooled_images(tiny_beit, photo_store, tmp_path):
    store, digests = photo_store
    singles = [[digests["coffee"]], [digests["chelsea"]]]
    extract_visual(singles, store, tmp_path / "first", settings(tiny_beit))
    extract_visual([[digests["coffee"], digests["chelsea"]]], store, tmp_path / "mean", settings(tiny_beit, image_mode="mean"))
    first, mean = load_features(tmp_path / "first"), load_features(tmp_path / "mean")
    np.testing.assert_allclose(mean.values[0], first.values.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert mean.counts[0] == 2


def test_unreadable_images_are_recorded_not_fatal(tiny_beit, photo_store, tmp_path, count_images):
    store, digests = photo_store
    corrupt = "ab" * 32
    image_path(store, corrupt).parent.mkdir(parents=True, exist_ok=True)
    image_path(store, corrupt).write_bytes(b"not a jpeg at all")
    absent = "cd" * 32
    hashes = [[corrupt], [absent], [digests["astronaut"], corrupt]]
    extract_visual(hashes, store, tmp_path / "visual", settings(tiny_beit, image_mode="mean"))
    features = load_features(tmp_path / "visual")
    np.testing.assert_array_equal(features.mask, [False, False, True])
    np.testing.assert_array_equal(features.counts, [0, 0, 1])
    index = pd.read_parquet(tmp_path / "visual" / "index.parquet")
    assert index.loc[0, "failure"].startswith(f"unreadable image {corrupt}: UnidentifiedImageError")
    assert index.loc[1, "failure"].startswith(f"unreadable image {absent}: FileNotFoundError")
    assert corrupt in index.loc[2, "failure"] and not index["reusable"].any()
    assert count_images["images"] == 1


def test_cache_reuse_partial_recompute_and_model_change(tiny_beit, photo_store, tmp_path, count_images):
    store, digests = photo_store
    out = tmp_path / "visual"
    hashes = [[digests["astronaut"]], [digests["coffee"]], []]
    extract_visual(hashes, store, out, settings(tiny_beit))
    assert count_images["images"] == 2
    first_run = np.array(load_features(out).values)

    extract_visual(hashes, store, out, settings(tiny_beit))
    assert count_images["images"] == 2  # unchanged: nothing encoded

    extract_visual([[digests["astronaut"]], [digests["chelsea"]], [], [digests["rocket"]]], store, out, settings(tiny_beit))
    assert count_images["images"] == 4  # entity 1 changed, entity 3 new
    np.testing.assert_array_equal(load_features(out).values[0], first_run[0])

    other_model = save_tiny_beit(tmp_path / "other-beit", seed=1)
    extract_visual([[digests["astronaut"]], [digests["chelsea"]], [], [digests["rocket"]]], store, out, settings(other_model))
    assert count_images["images"] == 7  # another model: every image again
    assert not np.allclose(load_features(out).values[0], first_run[0])

    extract_visual([[digests["astronaut"]], [digests["chelsea"]], [], [digests["rocket"]]], store, out, settings(other_model, stride=(8, 3)))
    assert count_images["images"] == 10  # other pooling: every image again
    assert load_features(out).values.shape == (4, 24, 10)


def test_no_images_needs_no_model(tmp_path, photo_store):
    store, _ = photo_store
    extract_visual([[], []], store, tmp_path / "visual", settings("no/such-model", dtype="float16"))
    features = load_features(tmp_path / "visual")
    assert features.values.shape == (2, 24, 15) and not features.mask.any()
    assert (tmp_path / "visual" / "features.npy").stat().st_size <= 128  # a header, no rows of zeros
    assert features.meta["config"]["model"] == {"name": "no/such-model", "hash": None}
    assert features.meta["config"]["preprocessing"] is None


def test_missing_model_offline_says_how_to_provide_it(tmp_path, photo_store, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    store, digests = photo_store
    with pytest.raises(ConfigError) as error:
        extract_visual([[digests["coffee"]]], store, tmp_path / "visual", settings("no-such-org/no-such-beit"))
    message = str(error.value)
    assert "extract_visual.model" in message and "local folder" in message and "HF_HUB_OFFLINE=1" in message
    assert "huggingface-cli download no-such-org/no-such-beit" in message
    assert not (tmp_path / "visual").exists()


def test_hidden_shape_must_match_the_model(tiny_beit, photo_store, tmp_path):
    store, digests = photo_store
    with pytest.raises(ConfigError, match=r"hidden_shape.*\[197, 32\]"):
        extract_visual([[digests["coffee"]]], store, tmp_path / "visual", settings(tiny_beit, hidden_shape=(197, 768)))


def test_stage_command(tiny_beit, photo_store, tmp_path):
    store, digests = photo_store
    pd.DataFrame({"id": range(3), "key": ["a", "b", "c"], "label": ["A", "B", "C"]}).to_parquet(tmp_path / "entities.parquet")
    write_media(tmp_path / "media.parquet", [{"entity": 0, "image_hashes": [digests["rocket"]]}, {"entity": 2}])
    (tmp_path / "params.yaml").write_text(
        f"extract_visual:\n  model: {tiny_beit}\n  hidden_shape: [197, 32]\n  kernel: [9, 3]\n  stride: [8, 2]\n"
        "  image_mode: first\n  batch_size: 2\n  dtype: float16\n  seed: 0\n  checkpoint_seconds: 600\n"
    )
    arguments = ["extract-visual", "mkg-w", "--data", str(tmp_path), "--media", str(tmp_path / "media.parquet"), "--images", str(store), "--out", str(tmp_path / "visual"), "--params", str(tmp_path / "params.yaml")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "3 entities, 3 recomputed" in result.output
    np.testing.assert_array_equal(load_features(tmp_path / "visual").mask, [True, False, False])
    features = tmp_path / "visual" / "features.npy"
    features.write_bytes(features.read_bytes()[:-100])  # the one stored row (entity 0's) truncated
    repaired = CliRunner().invoke(app, arguments)
    assert repaired.exit_code == 0, repaired.output
    assert "damaged cache" in repaired.output and "visual/features.npy: truncated" in repaired.output
    assert "3 entities, 1 recomputed, 2 reused" in repaired.output
    assert load_features(tmp_path / "visual").mask.tolist() == [True, False, False]
