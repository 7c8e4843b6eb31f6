"""Local sources: a folder of images named by entity key (symlinks leaving it refused), and
a CSV manifest."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse

import pandas as pd
import pytest
from PIL import Image

from fake_services import FakeServices, image_bytes
from pipeline.crawl import CrawlConfig, Manifest, crawl
from pipeline.crawl.driver import Crawler
from pipeline.crawl.http import FetchError
from pipeline.crawl.sources import file_names, local_name
from pipeline.errors import ConfigError, DataError
from test_crawl import crawl_params

DBR = "http://dbpedia.org/resource/"
KEYS = [DBR + "Chișinău", DBR + "AC/DC", DBR + "Hot_Foot_Powder_(album)", "Gilles_Mbang_Ondo"]


def entities() -> pd.DataFrame:
    return pd.DataFrame({"id": range(len(KEYS)), "key": KEYS, "label": ["Chișinău", "AC/DC", "Hot Foot Powder", None],
                         "dbpedia": None, "wikidata": None, "yago": None, "freebase": None})


def config(services=None) -> CrawlConfig:
    endpoints = services.endpoints() if services else {
        "dbpedia_sparql": "http://127.0.0.1:9/sparql", "wikidata_api": "http://127.0.0.1:9/w",
        "commons_file_path": "http://127.0.0.1:9/f/"}
    return CrawlConfig.from_params(crawl_params(endpoints))


def save(path, color, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path, format=fmt)


def done_images(manifest) -> dict[int, list[str]]:
    with contextlib.closing(sqlite3.connect(manifest)) as db:
        rows = db.execute("SELECT entity, url FROM images WHERE status='done' ORDER BY entity, priority").fetchall()
    result: dict[int, list[str]] = {}
    for entity, url in rows:
        result.setdefault(entity, []).append(url)
    return result


def test_file_names_of_keys():
    assert local_name("<http://dbpedia.org/resource/AC/DC>") == "AC/DC"
    assert file_names(DBR + "AC/DC") == ("AC%2FDC",)
    assert file_names(DBR + "Chișinău") == ("Chișinău", urllib.parse.quote("Chișinău", safe=""))
    assert file_names("Gilles_Mbang_Ondo") == ("Gilles_Mbang_Ondo",)
    assert file_names("http://www.wikidata.org/entity/Q42") == ("Q42",)
    assert local_name(DBR + "Arrow>") == "Arrow>" and local_name("<" + DBR + "Arrow>>") == "Arrow>"
    assert local_name("<Gilles") == "<Gilles"


def test_local_folder_matches_raw_and_percent_encoded_names_and_subfolders(tmp_path):
    folder = tmp_path / "images"
    save(folder / "Chișinău.png", (255, 0, 0))
    save(folder / "AC%2FDC.JPG", (0, 255, 0), fmt="JPEG")
    save(folder / "Gilles_Mbang_Ondo" / "1.png", (0, 0, 255))
    save(folder / "Gilles_Mbang_Ondo" / "2.png", (0, 0, 128))
    (folder / "Hot_Foot_Powder_(album).txt").write_text("not an image file")
    cfg = config()
    summary = crawl(entities(), tmp_path / "m.sqlite", tmp_path / "store", cfg, source="local-folder",
                    folder=folder, progress=False)
    done = done_images(tmp_path / "m.sqlite")
    assert sorted(done) == [0, 1, 3] and len(done[3]) == 1  # images_per_entity = 1
    assert summary.counts["lookups:local-folder"] == {"done": 3, "missing": 1}
    assert not summary.down_hosts  # no network used


def test_local_folder_refuses_symlinks_out_of_it_and_never_copies_file_bytes(tmp_path):
    outside, folder = tmp_path / "outside", tmp_path / "images"
    (outside / "album").mkdir(parents=True)
    (outside / "secret.png").write_bytes(b"TOPSECRET outside the folder")
    save(outside / "album" / "1.png", (9, 9, 9))
    save(folder / "real" / "inside.png", (0, 0, 255))
    (folder / "Chișinău.png").symlink_to(outside / "secret.png")  # a file link out
    (folder / "AC%2FDC").symlink_to(outside / "album", target_is_directory=True)  # a folder link out
    (folder / "Gilles_Mbang_Ondo.png").symlink_to(folder / "real" / "inside.png")  # a link inside: kept
    (folder / "Hot_Foot_Powder_(album).png").write_bytes(b"TOPSECRET in a file named .png")

    summary = crawl(entities(), tmp_path / "m.sqlite", tmp_path / "store", config(), source="local-folder",
                    folder=folder, progress=False)

    with contextlib.closing(sqlite3.connect(tmp_path / "m.sqlite")) as db:
        looked = {e: (s, r) for e, s, r in db.execute("SELECT entity, status, reason FROM lookups")}
        images = {e: (s, r) for e, s, r in db.execute("SELECT entity, status, reason FROM images")}
    assert looked[0] == ("failed", "Chișinău.png: refused, a symlink that leads out of the folder")
    assert looked[1] == ("failed", "AC%2FDC: refused, a symlink that leads out of the folder")
    assert images[3][0] == "done" and 0 not in images and 1 not in images
    assert images[2][0] == "failed" and "not an image" in images[2][1]
    assert summary.counts["images"] == {"done": 1, "failed": 1}
    assert b"TOPSECRET" not in (tmp_path / "m.sqlite").read_bytes()


def test_a_local_candidate_that_became_a_symlink_or_is_no_file_is_refused(tmp_path):
    crawler = Crawler(config(), None, tmp_path / "store", None, progress=False)
    save(tmp_path / "real.png", (1, 1, 1))
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block
    assert crawler._read_local(tmp_path / "real.png") == (tmp_path / "real.png").read_bytes()
    with pytest.raises(FetchError, match="a symlink now stands in its path"):
        crawler._read_local(tmp_path / "link.png")
    with pytest.raises(FetchError, match="not a regular file"):
        crawler._read_local(tmp_path / "pipe.png")


def test_csv_manifest_paths_urls_and_descriptions(tmp_path):
    services = FakeServices(lifetime=60).start()
    try:
        services.files["remote.jpg"] = image_bytes()
        save(tmp_path / "pics" / "a.png", (1, 2, 3))
        (tmp_path / "data.csv").write_text(
            "description,key,image\n"
            "\"Capital of Moldova. Big city.\",http://dbpedia.org/resource/Chișinău,pics/a.png\n"
            f",AC%2FDC,{services.base}/files/remote.jpg\n"
            "A YAGO entity.,Gilles_Mbang_Ondo,\n"
            "Nobody.,Unknown_entity,\n", encoding="utf-8")
        summary = crawl(entities(), tmp_path / "m.sqlite", tmp_path / "store", config(services), source="csv",
                        csv_manifest=tmp_path / "data.csv", progress=False)
    finally:
        services.stop()
    assert sorted(done_images(tmp_path / "m.sqlite")) == [0, 1]
    with Manifest(tmp_path / "m.sqlite", readonly=True) as manifest:
        assert sorted(manifest.descriptions()) == [(0, "csv", "Capital of Moldova. Big city."),
                                                   (3, "csv", "A YAGO entity.")]
    assert summary.unmatched_keys == 1 and "1 CSV keys match no entity" in summary.line()


def test_csv_image_paths_that_cannot_be_resolved_fail_only_their_entity(tmp_path):
    (tmp_path / "loop_a.png").symlink_to(tmp_path / "loop_b.png")
    (tmp_path / "loop_b.png").symlink_to(tmp_path / "loop_a.png")
    save(tmp_path / "ok.png", (1, 2, 3))
    (tmp_path / "data.csv").write_text(
        "key,image,description\n"
        "Chișinău,loop_a.png,A city.\n"
        "AC%2FDC,nul\0byte.png,\n"
        "Gilles_Mbang_Ondo,ok.png,\n", encoding="utf-8")
    crawl(entities(), tmp_path / "m.sqlite", tmp_path / "store", config(), source="csv",
          csv_manifest=tmp_path / "data.csv", progress=False)
    with contextlib.closing(sqlite3.connect(tmp_path / "m.sqlite")) as db:
        looked = {e: (s, r) for e, s, r in db.execute("SELECT entity, status, reason FROM lookups")}
    assert looked[0] == ("failed", "image path 'loop_a.png' of data.csv unusable: Symlink loop from "
                                   f"'{tmp_path / 'loop_a.png'}'")
    assert looked[1][0] == "failed" and "embedded null byte" in looked[1][1]
    assert looked[3] == ("done", None) and sorted(done_images(tmp_path / "m.sqlite")) == [3]
    with Manifest(tmp_path / "m.sqlite", readonly=True) as manifest:
        assert manifest.descriptions() == [(0, "csv", "A city.")]  # kept beside the failure


@pytest.mark.parametrize("content, line, problem", [
    ("key,image\nX,a.png\n", 1, "header must be"),
    ("key,image,description\nA,a.png,desc\nB,b.png\n", 3, "expected 3 fields, got 2"),
    ("key,image,description\nA,a.png,desc,extra\n", 2, "expected 3 fields, got 4"),
    ("key,image,description\n,a.png,desc\n", 2, "empty key"),
    ('key,image,description\nA,a.png,"unterminated\n', 2, "malformed CSV"),
])
def test_malformed_csv_names_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=problem) as error:
        crawl(entities(), tmp_path / "m.sqlite", tmp_path / "store", config(), source="csv", csv_manifest=path,
              progress=False)
    assert error.value.path == str(path) and error.value.line == line


def test_local_source_needs_its_location(tmp_path):
    with pytest.raises(ConfigError, match="--folder"):
        crawl(entities(), tmp_path / "m.sqlite", tmp_path / "s", config(), source="local-folder", progress=False)
    with pytest.raises(ConfigError, match="unknown source"):
        crawl(entities(), tmp_path / "m.sqlite", tmp_path / "s", config(), source="ftp", progress=False)
