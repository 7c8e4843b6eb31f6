"""The text-feature cache is byte-deterministic: the same sentences and settings, encoded
in separate directories (and with batches of another size), give identical files."""
from __future__ import annotations

from pipeline.features.text import TextSettings, extract_text

SENTENCES = [["Paris is the capital of France.", "It lies on the Seine."], [], ["Berlin"], ["Chisinau is in Moldova."] * 5]


def test_identical_inputs_give_identical_files(tmp_path):
    settings = TextSettings(model="packaged:all-MiniLM-L6-v2", max_sentences=4, batch_size=8, dtype="float16", seed=0)
    extract_text(SENTENCES, tmp_path / "a", settings)
    extract_text(SENTENCES, tmp_path / "b", settings)
    files = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert files == ["features.npy", "index.parquet", "meta.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
