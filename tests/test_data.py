"""The download stage: import from the embedded copy, a mirror, the network path, MKG-Y,
source order, errors, atomicity."""
from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.data import import_dataset, load_manifest
from pipeline.errors import DataError, PipelineError
from pipeline.graph import load_graph

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "datasets"


@pytest.fixture(scope="module")
def mkg_w(tmp_path_factory, mirror) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("canonical") / "mkg-w"
    return out, import_dataset(load_manifest(MANIFESTS / "mkg-w.yaml"), out, mirror=mirror)


def test_mkg_w_from_mirror(mkg_w):
    out, report = mkg_w
    assert report["counts"] == {"entities": 15000, "relations": 169, "train": 34196, "valid": 4276, "test": 4274,
                                "test_1-1": 247, "test_1-n": 18, "test_n-1": 2991, "test_n-n": 1018}
    graph = load_graph(out)
    assert (graph.num_entities, graph.num_relations) == (15000, 169)
    assert graph.train[0].tolist() == [0, 0, 1]  # train2id line 1 is "0 1 0": head 0, tail 1, relation 0
    entities = pd.read_parquet(out / "entities.parquet")
    first = entities.iloc[0]
    assert first["dbpedia"] == "http://dbpedia.org/resource/My_Darling_Clementine"
    assert first["wikidata"] == "http://www.wikidata.org/entity/Q370252"
    assert first["label"] == "My Darling Clementine"
    relations = pd.read_parquet(out / "relations.parquet")
    assert relations.iloc[0][["key", "label", "wikidata"]].tolist() == ["cast_member", "cast member",
                                                                        "http://www.wikidata.org/entity/P161"]
    assert sum(len(t) for t in graph.test_categories.values()) == len(graph.test)


def test_db15k_reports_leaky_valid_and_drops_it(tmp_path, mirror):
    manifest = load_manifest(MANIFESTS / "db15k.yaml")
    report = import_dataset(manifest, tmp_path / "db15k", mirror=mirror)
    kinds = {d["kind"]: d["count"] for d in report["defects"] if d["file"] == "valid"}
    assert kinds["valid_in_train"] == 8719 and kinds["valid_in_test"] == 1105
    cleaning = report["valid_cleaning"]
    assert cleaning["valid_before"] == 9904
    assert cleaning["valid_after"] == report["counts"]["valid"] == len(load_graph(tmp_path / "db15k").valid)
    assert cleaning["valid_after"] == 9904 - 8719 - cleaning["dropped_test_triples"] - cleaning["dropped_repeats"]
    assert any(d["kind"] == "count_differs_from_paper" for d in report["defects"])
    entities = pd.read_parquet(tmp_path / "db15k" / "entities.parquet")
    assert entities["freebase"].notna().all()
    assert entities.loc[0, "dbpedia"] == "http://dbpedia.org/resource/Anarchism"

    kept = import_dataset(manifest, tmp_path / "kept", mirror=mirror, drop_leaked=False)
    assert kept["counts"]["valid"] == 9904 and kept["valid_cleaning"] == {"applied": False}


def _write_mkg_y_mirror(root: Path) -> dict:
    """A small MKG-Y mirror in the documented format, and a manifest describing it."""
    folder = root / "MKG-Y"
    folder.mkdir(parents=True)
    names = ["Libreville", "Gilles_Mbang_Ondo", "Gabon", "Paris"]
    files = {
        "entity2id.txt": "".join(f"{n} {i}\n" for i, n in enumerate(names)),
        "relation2id.txt": "2\nwasBornIn 0\nisLocatedIn 1\n",
        "train.txt": "1\t0\t0\n0\t1\t2\n",
        "valid.txt": "3\t1\t2\n",
        "test.txt": "1\t1\t2\n2\t0\t3\n",
        "test_category_1-1.txt": "1\n1 2 1\n",
        "test_category_1-n.txt": "0\n",
        "test_category_n-1.txt": "1\n2 3 0\n",
        "test_category_n-n.txt": "0\n",
    }
    manifest = yaml.safe_load((MANIFESTS / "mkg-y.yaml").read_text())
    for name, text in files.items():
        (folder / name).write_text(text)
        manifest["files"][name]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    manifest["expected"] = {"entities": 4, "relations": 2, "train": 2, "valid": 1, "test": 2}
    path = root / "mkg-y.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return {"manifest": path, "folder": folder}


def test_mkg_y_from_documented_format(tmp_path):
    fixture = _write_mkg_y_mirror(tmp_path / "mirror")
    report = import_dataset(load_manifest(fixture["manifest"]), tmp_path / "out", mirror=tmp_path / "mirror")
    assert report["counts"]["test_n-1"] == 1
    graph = load_graph(tmp_path / "out")
    assert graph.test.tolist() == [[1, 1, 2], [2, 0, 3]]
    entities = pd.read_parquet(tmp_path / "out" / "entities.parquet")
    assert entities.loc[0, ["key", "yago", "dbpedia", "label"]].tolist() == [
        "Libreville", "Libreville", "http://dbpedia.org/resource/Libreville", "Libreville"]
    assert entities.loc[1, "label"] == "Gilles Mbang Ondo"


def test_mkg_y_manifest_pins_documented_checksums():
    manifest = load_manifest(MANIFESTS / "mkg-y.yaml")
    assert manifest.files["train.txt"].sha256 == "491857a4540068ef4d9d46f3d46d3e0295fa3564d4c1400baa13ef369bd41bd1"
    assert manifest.files["relation2id.txt"].repo == "zjukg/NATIVE"
    assert manifest.expected == {"entities": 15000, "relations": 28, "train": 21310, "valid": 2665, "test": 2663}


@pytest.fixture
def mirror_copy(tmp_path, mirror) -> Path:
    copy = tmp_path / "mirror"
    shutil.copytree(mirror / "MKG-W", copy / "MKG-W")
    return copy


def _corrupt(manifest_path: Path, mirror: Path, name: str, text: str, tmp_path: Path) -> Path:
    """Replace a mirror file and re-pin it, so the parser (not the checksum) sees the problem."""
    (mirror / "MKG-W" / name).write_text(text)
    raw = yaml.safe_load(manifest_path.read_text())
    raw["files"][name]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_checksum_mismatch_names_file_and_hashes(tmp_path, mirror_copy):
    target = mirror_copy / "MKG-W" / "train2id.txt"
    target.write_bytes(target.read_bytes() + b"0 1 0\n")
    manifest = load_manifest(MANIFESTS / "mkg-w.yaml")
    with pytest.raises(DataError) as error:
        import_dataset(manifest, tmp_path / "out", mirror=mirror_copy)
    message = str(error.value)
    assert str(target) in message and manifest.files["train2id.txt"].sha256 in message
    assert hashlib.sha256(target.read_bytes()).hexdigest() in message
    assert not (tmp_path / "out").exists()


def test_malformed_line_names_file_line_and_content(tmp_path, mirror_copy):
    text = (mirror_copy / "MKG-W" / "valid2id.txt").read_text().replace("4313 4112 0", "4313 4112", 1)
    manifest = _corrupt(MANIFESTS / "mkg-w.yaml", mirror_copy, "valid2id.txt", text, tmp_path)
    with pytest.raises(DataError) as error:
        import_dataset(load_manifest(manifest), tmp_path / "out", mirror=mirror_copy)
    assert error.value.line == 2 and error.value.content == "4313 4112"
    assert "valid2id.txt:2: expected 3 fields, found 2" in str(error.value)


def test_id_out_of_range(tmp_path, mirror_copy):
    text = (mirror_copy / "MKG-W" / "test2id.txt").read_text().replace("8471 962 62", "8471 15000 62", 1)
    manifest = _corrupt(MANIFESTS / "mkg-w.yaml", mirror_copy, "test2id.txt", text, tmp_path)
    with pytest.raises(DataError, match=r"test2id.txt:2: entity id out of range 0..14999"):
        import_dataset(load_manifest(manifest), tmp_path / "out", mirror=mirror_copy)


def test_missing_file(tmp_path, mirror_copy):
    (mirror_copy / "MKG-W" / "rel_links.txt").unlink()
    with pytest.raises(DataError, match=r"rel_links.txt: missing file in mirror"):
        import_dataset(load_manifest(MANIFESTS / "mkg-w.yaml"), tmp_path / "out", mirror=mirror_copy)


def test_failed_run_keeps_previous_output_and_leaves_nothing_partial(tmp_path, mirror_copy, mirror):
    out = tmp_path / "data" / "mkg-w"
    import_dataset(load_manifest(MANIFESTS / "mkg-w.yaml"), out, mirror=mirror)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (mirror_copy / "MKG-W" / "test_category_n-n.txt").write_text("1\n0 1 0\n")
    with pytest.raises(DataError):
        import_dataset(load_manifest(MANIFESTS / "mkg-w.yaml"), out, mirror=mirror_copy)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["mkg-w"]  # no temporaries left behind


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves ``/<repo>/<commit>/<path>`` from the mirror, like a raw-file host."""

    routes: dict[str, Path] = {}

    def translate_path(self, path):
        return str(self.routes.get(path, Path("/nonexistent")))

    def log_message(self, *args):
        pass


def test_network_path_downloads_and_verifies(tmp_path, mirror):
    manifest = load_manifest(MANIFESTS / "mkg-w.yaml")
    handler = type("Handler", (_MirrorHandler,), {"routes": {
        f"/{s.repo}/{s.commit}/{s.path}": mirror / "MKG-W" / s.name for s in manifest.files.values()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{{repo}}/{{commit}}/{{path}}"
        report = import_dataset(manifest, tmp_path / "out", url_template=url, timeout=5)
    finally:
        server.shutdown()
    assert report["source"] == "network" and report["counts"]["train"] == 34196


def test_unreachable_source_suggests_mirror(tmp_path):
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PipelineError, match=r"cannot reach 127.0.0.1:\d+ .*--mirror"):
        import_dataset(load_manifest(MANIFESTS / "mkg-w.yaml"), tmp_path / "out",
                       url_template=f"http://127.0.0.1:{port}/{{repo}}/{{commit}}/{{path}}", timeout=2)
    assert not (tmp_path / "out").exists()


def _stages(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env})


def test_cli_unknown_dataset_and_help(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    failed = _stages("download", "fb15k", cwd=tmp_path)
    assert failed.returncode == 2
    assert "unknown dataset 'fb15k'; valid: db15k, mkg-w, mkg-y" in failed.stderr
    assert "Traceback" not in failed.stderr
    listing = _stages("--help", cwd=tmp_path)
    assert listing.returncode == 0 and "download" in listing.stdout


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_cli_download_with_relative_mirror(tmp_path, mirror):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(mirror / "MKG-W", tmp_path / "local-mirror" / "MKG-W")
    done = _stages("download", "mkg-w", "--mirror", "local-mirror", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _report(tmp_path / "data" / "mkg-w")["source"] == "mirror"


def test_cli_download_uses_embedded_copy_without_mirror(tmp_path):
    """No mirror, no network (an unreachable source URL in params): the embedded copy is used."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["source_url"] = "http://127.0.0.1:9/{repo}/{commit}/{path}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = _stages("download", "db15k", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = _report(tmp_path / "data" / "db15k")
    assert report["source"] == "embedded" and report["raw_counts"]["train"] == 79222
    assert "db15k (from embedded)" in done.stdout
    failed = _stages("download", "mkg-y", cwd=tmp_path)  # MKG-Y is not embedded: the pinned source is tried
    assert failed.returncode == 2 and "cannot reach 127.0.0.1:9 for" in failed.stderr


def test_source_order_mirror_option_then_environment_then_embedded(tmp_path, mirror):
    """--mirror beats MMRNS_DATA_MIRROR, which beats the embedded copy: a broken mirror named
    by the environment fails unless --mirror names a good one."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    broken = tmp_path / "broken"
    (broken / "MKG-W").mkdir(parents=True)
    from_env = _stages("download", "mkg-w", cwd=tmp_path, MMRNS_DATA_MIRROR=str(broken))
    assert from_env.returncode == 2 and f"{broken / 'MKG-W'}" in from_env.stderr and "missing file in mirror" in from_env.stderr
    from_option = _stages("download", "mkg-w", "--mirror", str(mirror), cwd=tmp_path, MMRNS_DATA_MIRROR=str(broken))
    assert from_option.returncode == 0, from_option.stderr
    assert _report(tmp_path / "data" / "mkg-w")["source"] == "mirror"


def test_embedded_copy_missing_or_corrupt_file(tmp_path):
    manifest = load_manifest(MANIFESTS / "mkg-w.yaml")
    copy = tmp_path / "embedded"
    shutil.copytree(REPO / "datasets" / "mkg-w", copy)
    (copy / "rel_links.txt.xz").write_bytes(b"not xz")
    with pytest.raises(DataError, match=r"rel_links.txt.xz: not a valid xz file"):
        import_dataset(manifest, tmp_path / "out", embedded=copy)
    (copy / "rel_links.txt.xz").unlink()
    with pytest.raises(DataError, match=r"rel_links.txt.xz: missing file in the embedded copy"):
        import_dataset(manifest, tmp_path / "out", embedded=copy)
    assert not (tmp_path / "out").exists()


def test_embedded_copies_cover_exactly_their_manifests():
    for name in ("mkg-w", "db15k"):
        names = {path.name for path in (REPO / "datasets" / name).glob("*.xz")}
        assert names == {f"{file}.xz" for file in load_manifest(MANIFESTS / f"{name}.yaml").files}
    assert not (REPO / "datasets" / "mkg-y").exists()
