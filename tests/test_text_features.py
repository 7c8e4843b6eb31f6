"""SBERT text features: the packaged model, [S, D] zero padding, cache behaviour, errors."""
from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest_features import write_media
from pipeline.errors import ConfigError
from pipeline.features import load_features
from pipeline.features import text as text_features
from pipeline.features.text import TextSettings, extract_text, load_sentence_model, resolve_text_model
from stages import app
from stages import extract_text as extract_text_stage  # noqa: F401  (registers the command)

PACKAGED = "packaged:all-MiniLM-L6-v2"


def settings(**changes) -> TextSettings:
    return TextSettings(**{**dict(model=PACKAGED, max_sentences=4, batch_size=8, dtype="float32", seed=0), **changes})


@pytest.fixture(scope="module")
def packaged_model():
    return load_sentence_model(resolve_text_model(PACKAGED), torch.device("cpu"))


@pytest.fixture
def count_sentences(monkeypatch):
    """Counts the sentences that go through SBERT (wraps the real embed_sentences)."""
    counter = {"sentences": 0}
    embed = text_features.embed_sentences

    def counting(model, sentences, max_sentences, batch_size):
        counter["sentences"] += sum(len(entity_sentences[:max_sentences]) for entity_sentences in sentences)
        return embed(model, sentences, max_sentences, batch_size)

    monkeypatch.setattr(text_features, "embed_sentences", counting)
    return counter


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_packaged_sbert_ranks_paraphrases_above_unrelated(packaged_model):
    a, paraphrase, unrelated = packaged_model.encode(
        ["A man is playing a guitar on stage.", "On stage, a guitarist performs a song.", "The stock market fell sharply on Monday."]
    )
    assert cosine(a, paraphrase) > cosine(a, unrelated) + 0.2


def test_sentences_are_encoded_zero_padded_with_counts(packaged_model, tmp_path):
    sentences = [
        ["Paris is the capital of France.", "It lies on the Seine."],
        [],
        ["Berlin"],
        [f"Sentence number {i}." for i in range(6)],
    ]
    extract_text(sentences, tmp_path / "text", settings())
    features = load_features(tmp_path / "text")
    assert features.values.shape == (4, 4, 384)
    np.testing.assert_array_equal(features.mask, [True, False, True, True])
    np.testing.assert_array_equal(features.counts, [2, 0, 1, 4])
    assert not features.values[0, 2:].any() and not features.values[1].any()
    expected = packaged_model.encode(["It lies on the Seine.", "Berlin", "Sentence number 3."])
    np.testing.assert_allclose(features.values[[0, 2, 3], [1, 0, 3]], expected, atol=1e-5)
    assert pd.read_parquet(tmp_path / "text" / "index.parquet").loc[1, "failure"] == "no sentences"
    assert features.meta["config"]["model"]["name"] == PACKAGED and features.meta["config"]["max_sentences"] == 4


def test_cache_reuse_partial_recompute_and_invalidation(tmp_path, count_sentences):
    out = tmp_path / "text"
    sentences = [["Alpha."], ["Beta.", "Gamma."], ["Delta."]]
    extract_text(sentences, out, settings(dtype="float16"))
    assert count_sentences["sentences"] == 4
    assert load_features(out).values.dtype == np.float16

    extract_text(sentences, out, settings(dtype="float16"))
    assert count_sentences["sentences"] == 4  # unchanged: nothing encoded

    extract_text([["Alpha."], ["Beta changed."], ["Delta."], ["Epsilon.", "Zeta."]], out, settings(dtype="float16"))
    assert count_sentences["sentences"] == 7  # entity 1 changed, entity 3 new

    extract_text([["Alpha."], ["Beta changed."], ["Delta."], ["Epsilon.", "Zeta."]], out, settings(dtype="float16", max_sentences=3))
    assert count_sentences["sentences"] == 12  # another setting: everything again
    assert load_features(out).values.shape == (4, 3, 384)


def test_model_change_recomputes_all(tmp_path, count_sentences):
    out = tmp_path / "text"
    extract_text([["Alpha."], ["Beta."]], out, settings())
    before = np.array(load_features(out).values)
    changed = load_sentence_model(resolve_text_model(PACKAGED), torch.device("cpu"))
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.mul_(1.05)
    changed.save(str(tmp_path / "changed-model"))
    extract_text([["Alpha."], ["Beta."]], out, settings(model=str(tmp_path / "changed-model")))
    assert count_sentences["sentences"] == 4
    features = load_features(out)
    assert features.meta["config"]["model"]["name"] == str(tmp_path / "changed-model")
    assert not np.allclose(features.values, before, atol=1e-3)


def test_unknown_or_unavailable_models(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="valid: packaged:all-MiniLM-L6-v2"):
        extract_text([["x"]], tmp_path / "text", settings(model="packaged:nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="extract_text.model.*local folder.*HF_HUB_OFFLINE=1"):
        extract_text([["x"]], tmp_path / "text", settings(model="sentence-transformers/no-such-model"))


def test_stage_command(tmp_path):
    pd.DataFrame({"id": range(3), "key": ["a", "b", "c"], "label": ["A", "B", "C"]}).to_parquet(tmp_path / "entities.parquet")
    write_media(tmp_path / "media.parquet", [{"entity": 1, "sentences": ["B"]}, {"entity": 0, "sentences": ["A", "An a."]}])
    (tmp_path / "params.yaml").write_text(f"extract_text:\n  model: {PACKAGED}\n  max_sentences: 4\n  batch_size: 4\n  dtype: float16\n  seed: 0\n")
    arguments = ["extract-text", "mkg-w", "--data", str(tmp_path), "--media", str(tmp_path / "media.parquet"), "--out", str(tmp_path / "text"), "--params", str(tmp_path / "params.yaml")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    features = load_features(tmp_path / "text")
    np.testing.assert_array_equal(features.counts, [2, 1, 0])
    np.testing.assert_array_equal(features.mask, [True, True, False])


def test_bad_media_table_names_file_and_row(tmp_path):
    pd.DataFrame({"id": range(2), "key": ["a", "b"], "label": ["A", "B"]}).to_parquet(tmp_path / "entities.parquet")
    write_media(tmp_path / "media.parquet", [{"entity": 0, "sentences": ["A"]}, {"entity": 0, "sentences": ["B"]}])
    (tmp_path / "params.yaml").write_text(f"extract_text:\n  model: {PACKAGED}\n  max_sentences: 4\n  batch_size: 4\n  dtype: float16\n  seed: 0\n")
    arguments = ["extract-text", "mkg-w", "--data", str(tmp_path), "--media", str(tmp_path / "media.parquet"), "--out", str(tmp_path / "text"), "--params", str(tmp_path / "params.yaml")]
    result = CliRunner().invoke(app, arguments)
    assert "media.parquet: row 1: entity 0 has a second row" in str(result.exception)
