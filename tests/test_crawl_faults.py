"""Faults that must fail one item, never the crawl, against the loopback fake services:
replies of unexpected shape, transport and decoder errors, IRIs that need escaping, an
interrupted round; and property-based tests pushing random reply shapes and mutated image
bytes through the real parsing paths."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import signal
import sqlite3
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fake_services import DEPICTION, SAME_AS, THUMBNAIL, FakeServices, decoder_bug_images, image_bytes
from pipeline.crawl import CrawlConfig, Manifest, crawl
from pipeline.crawl.driver import Crawler
from pipeline.crawl.http import HttpClient
from pipeline.crawl.images import ImageConfig, ImageRejected, normalise_image
from pipeline.crawl.sources import (SPARQL_IRI_ESCAPES, DbpediaAbstracts, DbpediaImages, EntityRef, LookupResult,
                                    WikidataImages, _iri)
from test_crawl import DBR, WD, crawl_params, entities_table, image_rows, start_crawl_stage

SPARQL_JSON = {"Content-Type": "application/sparql-results+json"}
JSON = {"Content-Type": "application/json"}
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def services():
    server = FakeServices(lifetime=300).start()
    yield server
    server.stop()


def lookups(manifest_path: Path, source: str) -> dict[int, tuple[str, str | None]]:
    with contextlib.closing(sqlite3.connect(manifest_path)) as db:
        return {e: (s, r) for e, s, r in db.execute("SELECT entity, status, reason FROM lookups WHERE source=?",
                                                    (source,))}


def config_for(services: FakeServices, sources: list[str], **http) -> CrawlConfig:
    return CrawlConfig.from_params({**crawl_params(services.endpoints(), **http), "sources": sources})


def term(value, kind: str = "literal") -> dict:
    return {"type": kind, "value": value}


def sparql_reply(*rows) -> bytes:
    return json.dumps({"head": {"vars": ["e", "abstract"]}, "results": {"bindings": list(rows)}}).encode()


def claim(value) -> dict:
    return {"mainsnak": {"snaktype": "value", "datavalue": {"value": value, "type": "string"}}, "rank": "normal"}


GOOD_ROW = {"e": term(DBR + "Good", "uri"), "abstract": term("A good abstract.")}
SPARQL_CASES = {  # name -> (reply body, status of Good, status of Bad, reason of the failed ones)
    "reply is a string": (b'"oops"', "failed", "failed", "expected an object, got str"),
    "reply is a list": (b"[]", "failed", "failed", "expected an object, got list"),
    "not JSON": (b"<html>busy</html>", "failed", "failed", "malformed JSON"),
    "nested too deep": (b"[" * 100_000, "failed", "failed", "RecursionError"),
    "bindings an object": (b'{"results": {"bindings": {}}}', "failed", "failed", "bindings: expected a list"),
    "row a list": (sparql_reply(GOOD_ROW, [1, 2]), "failed", "failed", "bindings[1]: expected an object"),
    "?e a number": (sparql_reply(GOOD_ROW, {"e": term(5, "uri")}), "failed", "failed", "e.value: expected a string"),
    "abstract a number": (sparql_reply(GOOD_ROW, {"e": term(DBR + "Bad", "uri"), "abstract": term(7)}),
                          "done", "failed", "abstract.value: expected a string, got int"),
    "abstract a bare string": (sparql_reply(GOOD_ROW, {"e": term(DBR + "Bad", "uri"), "abstract": "text"}),
                               "done", "failed", "abstract: expected an object, got str"),
    "lone surrogate": (sparql_reply(GOOD_ROW, {"e": term(DBR + "Bad", "uri"), "abstract": term("x\ud800y")}),
                       "done", "failed", "lone surrogate"),
}


@pytest.mark.parametrize("case", SPARQL_CASES)
def test_sparql_reply_of_unexpected_shape_fails_its_entities_and_a_rerun_recovers(services, tmp_path, case):
    body, good, bad, reason = SPARQL_CASES[case]
    services.faults["/sparql"] = [(200, SPARQL_JSON, body)]
    services.abstracts = {DBR + "Good": "A good abstract.", DBR + "Bad": "A bad one, once."}
    entities, config = entities_table(["Good", "Bad"]), config_for(services, ["dbpedia-abstract"])

    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)

    rows = lookups(tmp_path / "m.sqlite", "dbpedia-abstract")
    assert (rows[0][0], rows[1][0]) == (good, bad)
    assert all(reason in r for s, r in rows.values() if s == "failed"), rows
    summary = crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, retry_failed=True, progress=False)
    assert summary.counts["lookups:dbpedia-abstract"] == {"done": 2}


WIKIDATA_CASES = {  # name -> (entities object or whole reply, status of Q2, reason)
    "entities a list": ({"entities": []}, "failed", "entities: expected an object, got list"),
    "API error": ({"error": {"code": "maxlag", "info": "Waiting for a database server"}}, "failed",
                  "Wikidata API error"),
    "API error quoting a lone surrogate": ({"error": {"code": "x", "info": "bad id Q\udfff"}}, "failed",
                                           "bad id Q\\udfff"),
    "record a string": ({"entities": {"Q2": "Q2"}}, "failed", "entities.Q2: expected an object, got str"),
    "record absent": ({"entities": {}}, "failed", "no entities.Q2 in the reply"),
    "P18 an object": ({"entities": {"Q2": {"claims": {"P18": {}}}}}, "failed", "claims.P18: expected a list"),
    "value a number": ({"entities": {"Q2": {"claims": {"P18": [claim(3)]}}}}, "failed", "expected a string, got int"),
    "lone surrogate": ({"entities": {"Q2": {"claims": {"P18": [claim("a\udc80.jpg")]}}}}, "failed", "lone surrogate"),
    "missing (right shape)": ({"entities": {"Q2": {"id": "Q2", "missing": ""}}}, "missing", "no entity Q2"),
    "claims an empty list": ({"entities": {"Q2": {"id": "Q2", "claims": []}}}, "missing", "no P18 claim"),
    "redirect under its target's id": ({"entities": {"Q7": {"id": "Q7", "redirects": {"from": "Q2", "to": "Q7"},
                                                            "claims": []}}}, "missing", "no P18 claim"),
}


@pytest.mark.parametrize("case", WIKIDATA_CASES)
def test_wikidata_reply_of_wrong_shape_is_failed_not_missing(services, tmp_path, case):
    reply, status, reason = WIKIDATA_CASES[case]
    if isinstance(reply.get("entities"), dict):  # Q1 well-formed beside the case's Q2
        reply["entities"]["Q1"] = {"id": "Q1", "claims": {"P18": [claim("One.jpg")]}}
    services.faults["/w/api.php"] = [(200, JSON, json.dumps(reply).encode())]
    config = config_for(services, ["wikidata-p18"])

    crawl(entities_table(["One", "Two"]), tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)

    rows = lookups(tmp_path / "m.sqlite", "wikidata-p18")
    assert rows[1][0] == status and reason in rows[1][1], rows
    if "entities" in reply and isinstance(reply["entities"], dict):
        assert rows[0] == ("done", None)


def test_only_wikidata_item_ids_are_asked_for(services, tmp_path):
    entities = entities_table(["Item", "Property", "Injected"])
    entities["wikidata"] = [WD + "Q1", WD + "P31", WD + "Q2|Q3"]
    services.p18["Q1"] = ["One.jpg"]
    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config_for(services, ["wikidata-p18"]),
          progress=False)
    rows = lookups(tmp_path / "m.sqlite", "wikidata-p18")
    assert rows[0] == ("done", None)
    assert rows[1] == ("missing", f"not a Wikidata item URI: '{WD}P31'")
    assert rows[2] == ("missing", f"not a Wikidata item URI: '{WD}Q2|Q3'")
    assert [key for key in services.hits if key.startswith("wikidata:")] == ["wikidata:Q1"]


def test_one_round_survives_every_transport_and_decoder_fault(services, tmp_path):
    """A body failing content decoding, a redirect to an invalid IDNA host name, decoder
    bugs: each item fails with its reason; every other item of the same round is recorded
    and never fetched again."""
    goods = {f"Good_{i}": image_bytes(color=(40 * i, 0, 0)) for i in range(4)}
    bugs = decoder_bug_images()
    files = {**goods, "Gzip": image_bytes(), "Idna": image_bytes(), **bugs}
    names = list(files)
    for i, name in enumerate(names):
        services.p18[f"Q{i + 1}"] = [f"{name}.img"]
        services.files[f"{name}.img"] = files[name]
    services.faults[services.file_path("Gzip.img")] = [(200, {"Content-Encoding": "gzip"}, b"not gzip at all")]
    services.faults["/wiki/Special:FilePath/Idna.img"] = [(302, {"Location": "http://xn--zz/Idna.img"}, b"")]
    config = config_for(services, ["wikidata-p18"], concurrency=3)

    summary = crawl(entities_table(names), tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)

    rows = image_rows(tmp_path / "m.sqlite")
    reasons = {"Gzip": "fails content decoding", "Idna": "invalid redirect Location 'http://xn--zz/Idna.img'",
               **{bug: f"decoder error: {bug}" for bug in bugs}}
    for i, name in enumerate(names):
        status, _, reason = rows[i]
        assert (status == "done") if name in goods else (status == "failed" and reasons[name] in reason), (name, reason)
    assert summary.counts["images"] == {"done": len(goods), "failed": len(reasons)}
    hits = services.hits.copy()
    crawl(entities_table(names), tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)
    assert services.hits == hits  # nothing finished is fetched again


class FaultySource:
    """A lookup source with a bug on entity 1 (one entity per batch)."""

    name, batch_size = "dbpedia-abstract", 1

    def lookup(self, batch: list[EntityRef]) -> LookupResult:
        if batch[0].id == 1:
            raise RuntimeError("a bug in a source")
        return LookupResult(outcomes=[(batch[0].id, "done", None)])


def test_any_exception_fails_only_its_batch_or_image(services, tmp_path):
    """The driver's last line of defence: an exception it knows nothing of (a source's bug,
    an error writing one image into the store) fails that item; the others are recorded."""
    config = config_for(services, ["wikidata-p18"])
    entities = entities_table(["A", "B", "C"])
    with Manifest(tmp_path / "m.sqlite") as manifest:
        Crawler(config, manifest, tmp_path / "images", None, progress=False).run_lookups(
            FaultySource(), entities, rescan=False)
    assert lookups(tmp_path / "m.sqlite", "dbpedia-abstract") == {
        0: ("done", None), 1: ("failed", "unexpected error: RuntimeError: a bug in a source"), 2: ("done", None)}

    services.p18 = {"Q1": ["A.jpg"], "Q2": ["B.jpg"]}
    services.files = {"A.jpg": image_bytes(color=(255, 0, 0)), "B.jpg": image_bytes(color=(0, 0, 255))}
    blocked = hashlib.sha256(normalise_image(services.files["B.jpg"], config.image)).hexdigest()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / blocked[:2]).write_text("a file where the store needs a folder")
    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)
    rows = image_rows(tmp_path / "m.sqlite")
    assert rows[0][0] == "done" and rows[1][0] == "failed" and "unexpected error: " in rows[1][2], rows


def test_interrupted_round_records_every_finished_item(services, tmp_path):
    """Ctrl-C in the middle of a download round: the items not started are cancelled, the
    running ones finish, and every image the server delivered is recorded done."""
    count = 48  # ~6 s of downloads at concurrency 3: Ctrl-C lands mid-round even on a loaded machine
    names = [f"Item_{i}" for i in range(count)]
    for i, name in enumerate(names):
        services.p18[f"Q{i + 1}"] = [f"{name}.jpg"]
        services.files[f"{name}.jpg"] = image_bytes(color=(i * 15, 0, 0))
    services.delays["/files/"] = 0.4
    params = {**crawl_params(services.endpoints(), concurrency=3, read_timeout=5.0), "sources": ["wikidata-p18"]}
    process, out = start_crawl_stage(tmp_path, names, params)
    files = [services.file_path(f"{name}.jpg") for name in names]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and sum(services.hits[f] for f in files) < 4:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode in (1, 130), stderr.decode()  # handled (click: 1, typer: 130), not killed

    delivered = {i for i, path in enumerate(files) if services.hits[path]}
    done = {entity for entity, (status, _, _) in image_rows(out / "manifest.sqlite").items() if status == "done"}
    assert done == delivered and 4 <= len(done) < count


def test_dbpedia_iris_escape_every_character_the_iriref_grammar_excludes(services, tmp_path):
    excluded = [*map(chr, range(0x21)), *'<>"{}|^`\\']
    names = [f"A{c}B" for c in excluded]
    for name in names:
        services.abstracts[DBR + urllib.parse.quote(name, safe="")] = f"About {name!r}."
    config = CrawlConfig.from_params({**crawl_params(services.endpoints()), "sources": ["dbpedia-abstract"],
                                      "sparql_batch": 50})

    summary = crawl(entities_table(names), tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)

    assert summary.counts["lookups:dbpedia-abstract"] == {"done": len(names)}
    assert set(SPARQL_IRI_ESCAPES) == set(excluded)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text())
def test_any_iri_becomes_one_valid_iriref(text):
    assert re.fullmatch(r'<[^<>"{}|^`\\\x00-\x20]*>', _iri(text))


# --- property-based: random reply shapes through the real lookup paths ----------------
TEXTS = st.one_of(st.text(max_size=12), st.builds(str.__add__, st.text(max_size=4),
                                                  st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)))


def _json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXTS,
                           _json_containers, max_leaves=8)
REFS = [EntityRef(i, DBR + name, DBR + name, f"{WD}Q{i + 1}") for i, name in enumerate(["A", "B", "C"])]
SPARQL_VALUES = [*(ref.dbpedia for ref in REFS), DEPICTION, THUMBNAIL, SAME_AS, WD + "Q9",
                 "http://commons.wikimedia.org/wiki/Special:FilePath/X.jpg"]


def _or_junk(strategy):
    return st.one_of(strategy, strategy, strategy, JSON_VALUES)


SPARQL_REPLIES = st.fixed_dictionaries({"results": _or_junk(st.fixed_dictionaries({"bindings": _or_junk(st.lists(
    _or_junk(st.dictionaries(st.sampled_from(["e", "abstract", "p", "o", "x"]), _or_junk(st.fixed_dictionaries(
        {"type": st.just("uri"), "value": st.one_of(st.sampled_from(SPARQL_VALUES), TEXTS, JSON_VALUES)})),
        max_size=4)), max_size=6))}))})
WIKIDATA_RECORDS = _or_junk(st.one_of(st.just({"missing": ""}), st.fixed_dictionaries({}, optional={
    "claims": _or_junk(st.fixed_dictionaries({}, optional={"P18": _or_junk(st.lists(_or_junk(st.fixed_dictionaries(
        {"mainsnak": _or_junk(st.fixed_dictionaries({}, optional={
            "snaktype": st.sampled_from(["value", "somevalue", "novalue"]),
            "datavalue": _or_junk(st.fixed_dictionaries({"value": _or_junk(TEXTS)}))}))},
        optional={"rank": st.sampled_from(["normal", "preferred", "deprecated"])})), max_size=3))}))})))
WIKIDATA_REPLIES = st.fixed_dictionaries({"entities": _or_junk(st.fixed_dictionaries(
    {}, optional={ref.wikidata.rsplit("/", 1)[1]: WIKIDATA_RECORDS for ref in REFS}))})


def _replies(structured):
    """Bodies: JSON of ``structured`` replies or of anything, or bytes that are not JSON."""
    return st.one_of(structured.map(json.dumps), structured.map(json.dumps), JSON_VALUES.map(json.dumps),
                     st.binary(max_size=40)).map(lambda body: body if isinstance(body, bytes) else body.encode())


def _assert_each_entity_ends_once(result, manifest: Manifest, source: str) -> None:
    statuses = {entity: (status, reason) for entity, status, reason in result.outcomes}
    assert len(result.outcomes) == len(statuses) == len(REFS)
    assert all(s in ("done", "missing") or (s == "failed" and r) for s, r in statuses.values()), statuses
    manifest.record_lookups(source, result.outcomes, result.descriptions, result.candidates, result.links)


@pytest.mark.parametrize("source", ["dbpedia-abstract", "dbpedia-image", "wikidata-p18"])
def test_random_reply_shapes_end_each_entity_done_missing_or_failed(services, tmp_path, source):
    endpoints = services.endpoints()
    replies = _replies(WIKIDATA_REPLIES if source == "wikidata-p18" else SPARQL_REPLIES)
    path = "/w/api.php" if source == "wikidata-p18" else "/sparql"
    with HttpClient(config_for(services, [source]).http) as client, Manifest(tmp_path / "m.sqlite") as manifest:
        lookup = {
            "dbpedia-abstract": DbpediaAbstracts(client, endpoints["dbpedia_sparql"], "en", 10),
            "dbpedia-image": DbpediaImages(client, endpoints["dbpedia_sparql"], 10, 0, endpoints["commons_file_path"], 32),
            "wikidata-p18": WikidataImages(client, endpoints["wikidata_api"], 10, 0, endpoints["commons_file_path"], 32),
        }[source]

        @PROPERTY
        @given(replies)
        def check(body):
            services.faults[path] = [(200, JSON, body)]
            _assert_each_entity_ends_once(lookup.lookup(REFS), manifest, source)

        check()


# --- property-based: mutated image bytes ------------------------------------------------
def _seed_images() -> dict[str, bytes]:
    noise = Image.effect_noise((24, 16), 60).convert("RGB")
    seeds = {}
    for fmt, mode in [("PNG", "RGB"), ("PNG", "I;16"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("WEBP", "RGB"), ("ICO", "RGB"), ("TGA", "RGB"), ("PCX", "RGB"),
                      ("DDS", "RGB"), ("SPIDER", "F")]:
        out = io.BytesIO()
        noise.convert(mode).save(out, format=fmt)
        seeds[f"{fmt}-{mode}"] = out.getvalue()
    return {**seeds, **decoder_bug_images()}


SEEDS = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A seed image with a few bytes set, cut, inserted, or its tail dropped."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at, kind = draw(st.integers(0, len(data) - 1)), draw(st.sampled_from(["set", "cut", "insert", "truncate"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    return bytes(data)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(mutated_images())
def test_mutated_image_bytes_give_a_jpeg_or_a_rejection(data):
    try:
        jpeg = normalise_image(data, ImageConfig(max_side=32, max_pixels=1_000_000))
    except ImageRejected as error:
        assert str(error) and "\n" not in str(error)
        return
    with Image.open(io.BytesIO(jpeg)) as result:
        assert result.format == "JPEG" and result.mode == "RGB" and max(result.size) <= 32


def test_mutated_images_served_over_http_end_done_or_failed_and_the_run_goes_on(services):
    config = config_for(services, ["wikidata-p18"])
    services.p18 = {"Q1": ["Good.jpg"], "Q2": ["Mutated.img"]}
    services.files["Good.jpg"] = image_bytes()
    entities = entities_table(["Good", "Mutated"])

    @settings(max_examples=15, deadline=None, derandomize=True, database=None)
    @given(mutated_images())
    def check(data):
        services.files["Mutated.img"] = data
        with tempfile.TemporaryDirectory() as folder:
            crawl(entities, Path(folder) / "m.sqlite", Path(folder) / "images", config, progress=False)
            rows = image_rows(Path(folder) / "m.sqlite")
        assert rows[0][0] == "done" and rows[1][0] in ("done", "failed")
        assert (rows[1][0] == "done") == (rows[1][2] is None)

    check()
