"""The crawl manifest file is deterministic: the same results recorded in another order (as
concurrent workers deliver them) give a byte-identical file, with no clock time in it."""
from __future__ import annotations

import sqlite3

from pipeline.crawl.manifest import Manifest

LOOKUPS = [(entity, "done" if entity % 2 else "missing", None if entity % 2 else "no abstract") for entity in range(50)]
DESCRIPTIONS = [(entity, f"Entity {entity}. A description.") for entity in range(1, 50, 2)]
CANDIDATES = [(entity, f"https://example.org/{entity}.jpg", 0) for entity in range(0, 50, 3)]


def write(path, order):
    with Manifest(path) as manifest:
        for chunk in order:
            manifest.record_lookups("dbpedia-abstract", [LOOKUPS[i] for i in chunk],
                                    descriptions=[d for d in DESCRIPTIONS if d[0] in chunk],
                                    candidates=[c for c in CANDIDATES if c[0] in chunk])
        for entity, url, _ in reversed(CANDIDATES) if order[0][0] else CANDIDATES:
            manifest.record_image(entity, url, "done", f"{entity:064x}", None)


def test_same_results_in_another_order_give_identical_bytes(tmp_path):
    write(tmp_path / "a.sqlite", [range(0, 25), range(25, 50)])
    write(tmp_path / "b.sqlite", [range(25, 50), range(0, 25)])
    assert (tmp_path / "a.sqlite").read_bytes() == (tmp_path / "b.sqlite").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sqlite", "b.sqlite"]  # no -wal, no temporaries
    with Manifest(tmp_path / "a.sqlite", readonly=True) as manifest:
        assert len(manifest.done_images()) == len(CANDIDATES)


def test_rows_carry_the_run_number(tmp_path):
    path = tmp_path / "m.sqlite"
    write(path, [range(50)])
    with Manifest(path) as manifest:  # a second run rewrites one lookup
        manifest.record_lookups("dbpedia-abstract", [(0, "done", None)])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("SELECT updated FROM lookups WHERE entity=0").fetchone()[0] == 2
    assert db.execute("SELECT DISTINCT updated FROM lookups WHERE entity>0").fetchall() == [(1,)]
