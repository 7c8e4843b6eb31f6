"""Shared test settings: offline model hub, and a benchmark mirror built from the copy of
MKG-W and DB15K embedded in the repository (datasets/<name>/*.xz)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = ("mkg-w", "db15k")


@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> Path:
    """A mirror directory (``MKG-W/``, ``DB15K/`` with the source file names), unpacked from
    the embedded copies; every file is checked against its manifest's SHA-256 pin."""
    from pipeline.data import load_manifest, unpack_embedded
    from pipeline.data.fetch import sha256_of

    root = tmp_path_factory.mktemp("mirror")
    for name in EMBEDDED:
        manifest = load_manifest(REPO / "datasets" / f"{name}.yaml")
        folder = root / manifest.mirror_dir
        folder.mkdir()
        for source in manifest.files.values():
            unpack_embedded(source, REPO / "datasets" / name, folder / source.name)
            assert sha256_of(folder / source.name) == source.sha256, f"embedded {name}/{source.name} differs from its pin"
    return root
