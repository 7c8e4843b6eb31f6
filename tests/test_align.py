"""The align stage: sentences, label fallback, seeded image choice, coverage, output."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.align import AlignConfig, align, choose_images, split_sentences, write_media
from pipeline.crawl import Manifest
from pipeline.crawl.images import ImageConfig, normalise_image, store_image
from pipeline.errors import ConfigError, DataError
from pipeline.media import MEDIA_COLUMNS

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, expected", [
    ("Paris is a city. It is in France.", ["Paris is a city.", "It is in France."]),
    ("Dr. No is a film. Mr. Smith met St. Peter.", ["Dr. No is a film.", "Mr. Smith met St. Peter."]),
    ("J. R. R. Tolkien wrote it. The U.S. Army e.g. fought.", ["J. R. R. Tolkien wrote it.", "The U.S. Army e.g. fought."]),
    ("It costs 3.5 dollars! Really? Yes.", ["It costs 3.5 dollars!", "Really?", "Yes."]),
    ('He said "Go." Then left. (Born 1950.) 1999 was late.', ['He said "Go."', "Then left.", "(Born 1950.)", "1999 was late."]),
    ("no capital after. the period", ["no capital after. the period"]),
    ("  Spaces\n  and lines.  ", ["Spaces and lines."]),
    ("", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_choose_images_is_seeded_per_entity_and_order_free():
    pool = [f"{i:064x}" for i in range(10)]
    first = choose_images(pool, 3, seed=0, entity=5)
    assert len(set(first)) == 3 and set(first) <= set(pool)
    assert choose_images(list(reversed(pool)), 3, seed=0, entity=5) == first
    draws = {tuple(choose_images(pool, 3, seed=s, entity=5)) for s in range(10)}
    assert len(draws) > 1
    assert choose_images(pool[:2], 3, seed=0, entity=5) == pool[:2]


def make_crawl(tmp_path: Path) -> tuple[pd.DataFrame, Path, Path]:
    """Entities 0..4: 0 abstract + 3 images, 1 csv and abstract, 2 image only, 3 nothing,
    4 nothing and no label; plus one done image whose file is gone."""
    entities = pd.DataFrame({"id": [4, 0, 1, 2, 3], "key": ["http://dbpedia.org/resource/Fifth_one", "A", "B", "C", "D"],
                             "label": [None, "A", "B", "C", "D"], "dbpedia": None, "wikidata": None})
    store, manifest_path = tmp_path / "images", tmp_path / "manifest.sqlite"
    config = ImageConfig(max_side=16)
    digests = [store_image(normalise_image(_png(c), config), store) for c in range(4)]
    with Manifest(manifest_path) as manifest:
        manifest.record_lookups("dbpedia-abstract", [(0, "done", None), (1, "done", None)],
                                descriptions=[(0, " ".join(f"Sentence {i}." for i in range(6))), (1, "From DBpedia.")])
        manifest.record_lookups("csv", [(1, "done", None)], descriptions=[(1, "From the user. Second.")])
        manifest.record_lookups("wikidata-p18", [(0, "done", None), (2, "done", None)],
                                candidates=[(0, "u0", 0), (0, "u1", 1), (0, "u2", 2), (2, "u3", 0), (2, "u4", 1)])
        for entity, url, digest in [(0, "u0", digests[0]), (0, "u1", digests[1]), (0, "u2", digests[2]),
                                    (2, "u3", digests[3]), (2, "u4", "f" * 64)]:
            manifest.record_image(entity, url, "done", digest, None)
    return entities, manifest_path, store


def _png(color: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), (color * 60, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def test_align_table_and_coverage(tmp_path):
    entities, manifest_path, store = make_crawl(tmp_path)
    table, coverage = align(entities, manifest_path, store, AlignConfig(seed=0, images_per_entity=2))
    assert list(table.entity) == [0, 1, 2, 3, 4]
    rows = table.set_index("entity")
    assert rows.sentences[0] == [f"Sentence {i}." for i in range(4)]  # first 4 kept
    assert rows.sentences[1] == ["From the user.", "Second."] and rows.description_source[1] == "csv"
    assert (rows.text_source[2], rows.sentences[2]) == ("label", ["C"])
    assert rows.sentences[4] == ["Fifth one"]  # no label: the key's local name
    assert len(rows.image_hashes[0]) == 2 and rows.images_available[0] == 3
    assert len(rows.image_hashes[2]) == 1  # the image missing from the store is dropped
    assert rows.image_hashes[3] == [] and pd.isna(rows.description_source[3])
    assert coverage == {"entities": 5, "with_description": 2, "label_fallback": 3, "with_images": 2,
                        "with_text_and_images": 1, "with_neither": 2, "images_chosen": 3,
                        "images_missing_from_store": 1}
    again, _ = align(entities, manifest_path, store, AlignConfig(seed=0, images_per_entity=2))
    assert again.image_hashes.tolist() == table.image_hashes.tolist()

    write_media(table, tmp_path / "media" / "entities_media.parquet")
    schema = pq.read_schema(tmp_path / "media" / "entities_media.parquet")
    assert schema.names[:4] == list(MEDIA_COLUMNS) and str(schema.field("entity").type) == "int64"
    assert str(schema.field("sentences").type) == "list<element: string>"


def test_align_stage_writes_media_and_metrics(tmp_path):
    entities, manifest_path, store = make_crawl(tmp_path)
    (tmp_path / "data").mkdir()
    entities.to_parquet(tmp_path / "data" / "entities.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"align": {"seed": 3, "images_per_entity": 1}}))
    result = subprocess.run(
        [sys.executable, "-m", "stages", "align", "toy", "--data", str(tmp_path / "data"), "--crawl", str(tmp_path),
         "--out", str(tmp_path / "media"), "--report", str(tmp_path / "coverage.json"),
         "--params", str(tmp_path / "params.yaml")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "coverage.json").read_text())["label_fallback"] == 3
    assert len(pd.read_parquet(tmp_path / "media" / "entities_media.parquet")) == 5


def test_missing_manifest_and_bad_params(tmp_path):
    entities, _, _ = make_crawl(tmp_path)
    with pytest.raises(DataError, match="crawl manifest not found"):
        align(entities, tmp_path / "none.sqlite", tmp_path, AlignConfig(seed=0))
    with pytest.raises(ConfigError, match="images_per_entity"):
        AlignConfig.from_params({"seed": 0, "images_per_entity": 0})
    with pytest.raises(ConfigError, match="unexpected keyword"):
        AlignConfig.from_params({"seed": 0, "colour": 1})
