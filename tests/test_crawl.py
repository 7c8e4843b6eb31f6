"""The crawl driver against loopback stand-ins of DBpedia, Wikidata and Commons: lookups,
downloads, injected faults, resume after SIGKILL, offline behaviour, retries."""
from __future__ import annotations

import contextlib
import email.utils
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from fake_services import DEPICTION, THUMBNAIL, FakeServices, image_bytes
from pipeline.crawl import CrawlConfig, Manifest, crawl
from pipeline.errors import ConfigError
from pipeline.media import image_path

REPO = Path(__file__).resolve().parent.parent
DBR = "http://dbpedia.org/resource/"
WD = "http://www.wikidata.org/entity/"


def crawl_params(endpoints: dict[str, str], **http) -> dict:
    """A ``crawl`` params section with test-sized timeouts and back-offs."""
    return {
        "sources": ["dbpedia-abstract", "wikidata-p18", "dbpedia-image"],
        "images_per_entity": 1, "language": "en", "sparql_batch": 4, "wikidata_batch": 3,
        "endpoints": endpoints,
        "http": {"user_agent": "mmrns-tests/1.0 (test@example.org)", "concurrency": 4,
                 "requests_per_second_per_host": 0, "max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05,
                 "max_retry_after": 5, "connect_timeout": 1.0, "read_timeout": 0.4, "max_bytes": 200_000,
                 "max_redirects": 3, "host_down_after": 2, "seed": 0, **http},
        "image": {"max_side": 32, "jpeg_quality": 85, "max_pixels": 1_000_000},
    }


def entities_table(names: list[str], wikidata: bool = True) -> pd.DataFrame:
    return pd.DataFrame({
        "id": range(len(names)), "key": [DBR + n for n in names], "label": [n.replace("_", " ") for n in names],
        "dbpedia": [DBR + n for n in names], "wikidata": [f"{WD}Q{i + 1}" if wikidata else None for i in range(len(names))],
        "yago": None, "freebase": None,
    })


def start_crawl_stage(tmp_path: Path, names: list[str], params: dict) -> tuple[subprocess.Popen, Path]:
    """``python -m stages crawl`` of the entities ``names`` with the ``crawl`` section ``params``,
    started in a subprocess; returns it and its crawl directory."""
    data, out = tmp_path / "data", tmp_path / "crawl"
    data.mkdir()
    entities_table(names).to_parquet(data / "entities.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"crawl": params}))
    command = [sys.executable, "-m", "stages", "crawl", "toy", "--data", str(data), "--out", str(out),
               "--params", str(tmp_path / "params.yaml"), "--no-progress"]
    # Ctrl-C as from a terminal: SIGINT at its default even if something in this test process ignores it
    # (a child inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt handler).
    restore_interrupt = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=restore_interrupt)
    return process, out


def image_rows(manifest_path: Path) -> dict[int, tuple[str, str | None, str | None]]:
    with contextlib.closing(sqlite3.connect(manifest_path)) as db:
        return {e: (s, d, r) for e, s, d, r in db.execute("SELECT entity, status, digest, reason FROM images")}


@pytest.fixture
def services():
    server = FakeServices(lifetime=120).start()
    yield server
    server.stop()


def test_lookups_downloads_and_every_injected_fault(services, tmp_path):
    jpeg, png = image_bytes((80, 60)), image_bytes((40, 100), (10, 200, 10), fmt="PNG")
    scenarios = {  # entity name -> (Commons file, bytes, faults before the answer)
        "Good_jpeg": ("Good.jpg", jpeg, []),
        "Good_png": ("Good.png", png, []),
        "Rate_limited": ("Limited.jpg", image_bytes(color=(1, 2, 3)), [(429, {"Retry-After": "1"}, b"slow down")]),
        "Flaky": ("Flaky.jpg", image_bytes(color=(4, 5, 6)), [(500, {}, b"oops")]),
        "Timeout": ("Timeout.jpg", jpeg, []),
        "Truncated": ("Truncated.jpg", jpeg[: len(jpeg) // 2], []),
        "Html": ("Page.jpg", b"<!DOCTYPE html><html><body>Not an image</body></html>", []),
        "Oversized": ("Huge.jpg", jpeg + b"\0" * 300_000, []),
        "Loop": ("Loop.jpg", None, [(302, {"Location": "/files/Loop.jpg"}, b"")] * 10),
        "File_scheme": ("Secret.jpg", None, [(302, {"Location": "file:///etc/passwd"}, b"")]),
        "Ftp_scheme": ("Ftp.jpg", None, [(302, {"Location": "ftp://127.0.0.1/x.jpg"}, b"")]),
        "Not_found": ("Gone.jpg", None, []),
    }
    names = [*scenarios, "No_image"]
    entities = entities_table(names)
    for i, (name, (file, payload, faults)) in enumerate(scenarios.items()):
        services.p18[f"Q{i + 1}"] = [file]
        if payload is not None:
            services.files[file] = payload
        if faults:
            services.faults[services.file_path(file)] = list(faults)
    services.p18[f"Q{len(names)}"] = []
    services.delays[services.file_path("Timeout.jpg")] = 2.0
    services.abstracts[DBR + "Good_jpeg"] = "A good image. It is a JPEG."
    config = CrawlConfig.from_params(crawl_params(services.endpoints()))

    summary = crawl(entities, tmp_path / "manifest.sqlite", tmp_path / "images", config, progress=False)

    rows = image_rows(tmp_path / "manifest.sqlite")
    ids = {name: i for i, name in enumerate(names)}
    for name in ("Good_jpeg", "Good_png", "Rate_limited", "Flaky"):
        status, digest, reason = rows[ids[name]]
        assert status == "done", (name, reason)
        with Image.open(image_path(tmp_path / "images", digest)) as stored:
            assert stored.format == "JPEG" and stored.mode == "RGB" and max(stored.size) == 32
    expected_reasons = {
        "Timeout": "ReadTimeout", "Truncated": "truncated", "Html": "not an image", "Oversized": "max_bytes",
        "Loop": "too many redirects", "File_scheme": "refused URL scheme 'file'",
        "Ftp_scheme": "refused URL scheme 'ftp'", "Not_found": "HTTP 404",
    }
    for name, reason in expected_reasons.items():
        status, digest, actual = rows[ids[name]]
        assert status == "failed" and digest is None and reason in actual, (name, actual)
    assert ids["No_image"] not in rows
    # Retry-After: 1 was honoured: the retry came at least a second after the 429.
    limited = [t for t, path in services.requests if path == services.file_path("Limited.jpg")]
    assert len(limited) == 2 and limited[1] - limited[0] >= 0.95
    assert len([p for _, p in services.requests if p == services.file_path("Flaky.jpg")]) == 2
    assert len([p for _, p in services.requests if p == services.file_path("Timeout.jpg")]) == 3  # max_attempts
    with Manifest(tmp_path / "manifest.sqlite", readonly=True) as manifest:
        assert manifest.descriptions() == [(ids["Good_jpeg"], "dbpedia-abstract", "A good image. It is a JPEG.")]
        counts = manifest.counts()
    assert counts["lookups:wikidata-p18"] == {"done": len(scenarios), "missing": 1}
    assert counts["lookups:dbpedia-abstract"] == {"done": 1, "missing": len(names) - 1}
    assert counts["images"] == {"done": 4, "failed": 8}
    assert "images done=4 failed=8" in summary.line()


def test_dbpedia_images_sameas_links_and_candidate_fallback(services, tmp_path):
    """DB15K-like entities (no Wikidata URI): DBpedia gives depiction/thumbnail and the
    sameAs link to Wikidata; P18 ranks first; a failing candidate is replaced by the next."""
    entities = entities_table(["Alpha", "Beta"], wikidata=False)
    commons = "http://commons.wikimedia.org/wiki/Special:FilePath/"
    services.depictions[DBR + "Alpha"] = [(DEPICTION, commons + "Alpha%20photo.jpg"),
                                          (THUMBNAIL, commons + "Alpha_photo.jpg?width=300")]
    services.same_as[DBR + "Alpha"] = WD + "Q7"
    services.p18["Q7"] = ["Broken.jpg"]
    services.files["Broken.jpg"] = b"<html>error page</html>"
    services.files["Alpha_photo.jpg"] = image_bytes(color=(9, 9, 9))
    config = CrawlConfig.from_params(crawl_params(services.endpoints()))

    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)

    with contextlib.closing(sqlite3.connect(tmp_path / "m.sqlite")) as db:
        images = db.execute("SELECT entity, url, source, status FROM images ORDER BY priority").fetchall()
        lookups = dict(db.execute("SELECT entity, status FROM lookups WHERE source='wikidata-p18'"))
    base = services.endpoints()["commons_file_path"]
    # depiction and thumbnail name the same Commons file: one candidate, fetched at width=max_side
    assert images == [(0, f"{base}Broken.jpg?width=32", "wikidata-p18", "failed"),
                      (0, f"{base}Alpha_photo.jpg?width=32", "dbpedia-image", "done")]
    assert lookups == {0: "done", 1: "missing"}
    assert services.hits[services.file_path("Alpha_photo.jpg")] == 1


def test_offline_marks_everything_unreachable_quickly_then_retries(services, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    entities = entities_table([f"E{i}" for i in range(400)])
    offline = CrawlConfig.from_params(crawl_params({
        "dbpedia_sparql": f"{dead}/sparql", "wikidata_api": f"{dead}/w/api.php",
        "commons_file_path": f"{dead}/wiki/Special:FilePath/"}))
    start = time.monotonic()
    summary = crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", offline, progress=False)
    assert time.monotonic() - start < 10
    assert list(summary.down_hosts) == [dead.removeprefix("http://")]
    for source in ("dbpedia-abstract", "dbpedia-image", "wikidata-p18"):
        assert summary.counts[f"lookups:{source}"] == {"unreachable": 400}
    assert "unreachable hosts" in summary.line() and "\n" not in summary.line()

    # The next run (network back) retries unreachable work without --retry-failed.
    services.abstracts[DBR + "E3"] = "Back online."
    services.p18["Q4"] = ["E3.png"]
    services.files["E3.png"] = image_bytes(fmt="PNG")
    online = CrawlConfig.from_params(crawl_params(services.endpoints()))
    summary = crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", online, progress=False)
    assert summary.counts["lookups:dbpedia-abstract"] == {"done": 1, "missing": 399}
    assert summary.counts["images"] == {"done": 1}
    assert not summary.down_hosts


def test_failed_items_are_kept_until_retry_failed(services, tmp_path):
    entities = entities_table(["Ok", "Broken"])
    services.p18 = {"Q1": ["Ok.jpg"], "Q2": ["Broken.jpg"]}
    services.files["Ok.jpg"] = image_bytes()
    services.faults[services.file_path("Broken.jpg")] = [(503, {}, b"down")] * 3
    config = CrawlConfig.from_params(crawl_params(services.endpoints()))
    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)
    assert image_rows(tmp_path / "m.sqlite")[1][0] == "failed"
    hits_before = services.hits.copy()

    services.files["Broken.jpg"] = image_bytes(color=(0, 0, 255))
    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)
    assert image_rows(tmp_path / "m.sqlite")[1][0] == "failed"  # not retried by default
    assert services.hits == hits_before  # and nothing done was fetched again

    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, retry_failed=True, progress=False)
    rows = image_rows(tmp_path / "m.sqlite")
    assert rows[0][0] == rows[1][0] == "done"
    assert services.hits[services.file_path("Ok.jpg")] == 1


@pytest.mark.parametrize("language, valid", [("en", True), ("pt-BR", True), ('en") } #', False), ("", False)])
def test_language_must_be_a_tag_since_it_goes_into_the_query(language, valid):
    params = {**crawl_params({"dbpedia_sparql": "http://x/s", "wikidata_api": "http://x/w",
                              "commons_file_path": "http://x/f/"}), "language": language}
    if valid:
        assert CrawlConfig.from_params(params).language == language
    else:
        with pytest.raises(ConfigError, match="crawl.language must be a language tag"):
            CrawlConfig.from_params(params)


def test_retry_after_above_cap_fails_without_waiting(services, tmp_path):
    entities = entities_table(["Patient"])
    services.p18["Q1"] = ["P.jpg"]
    when = email.utils.formatdate(time.time() + 3600, usegmt=True)  # HTTP-date form
    services.faults[services.file_path("P.jpg")] = [(429, {"Retry-After": when}, b"")]
    config = CrawlConfig.from_params(crawl_params(services.endpoints()))
    start = time.monotonic()
    crawl(entities, tmp_path / "m.sqlite", tmp_path / "images", config, progress=False)
    status, _, reason = image_rows(tmp_path / "m.sqlite")[0]
    assert status == "failed" and "max_retry_after" in reason and time.monotonic() - start < 5


def test_killed_crawl_resumes_without_refetching_or_losing_items(services, tmp_path):
    count = 12
    names = [f"Item_{i}" for i in range(count)]
    for i, name in enumerate(names):
        services.abstracts[DBR + name] = f"{name} is item number {i}. It exists."
        services.p18[f"Q{i + 1}"] = [f"{name}.jpg"]
        services.files[f"{name}.jpg"] = image_bytes(color=(i * 20, 0, 0))
    services.delays["/files/"] = 0.3
    params = crawl_params(services.endpoints(), concurrency=1, read_timeout=5.0)
    process, out = start_crawl_stage(tmp_path, names, params)
    manifest = out / "manifest.sqlite"
    deadline = time.monotonic() + 90
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.is_file():
            try:
                with contextlib.closing(sqlite3.connect(manifest)) as db:
                    done = db.execute("SELECT COUNT(*) FROM images WHERE status='done'").fetchone()[0]
            except sqlite3.OperationalError:  # tables not created yet
                done = 0
        if done >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert 4 <= done < count

    config = CrawlConfig.from_params(params)
    summary = crawl(entities_table(names), manifest, out / "images", config, progress=False)

    assert summary.counts["images"] == {"done": count}
    assert summary.counts["lookups:dbpedia-abstract"] == {"done": count}
    rows = image_rows(manifest)
    assert all(image_path(out / "images", digest).is_file() for _, digest, _ in rows.values())
    for name in names:  # every item delivered exactly once over both runs
        assert services.hits[services.file_path(f"{name}.jpg")] == 1
        assert services.hits[f"sparql:abstract:{DBR + name}"] == 1
    assert all(services.hits[f"wikidata:Q{i + 1}"] == 1 for i in range(count))
    assert not (out / "manifest.sqlite-wal").exists()  # a finished crawl leaves one file
