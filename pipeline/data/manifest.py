"""Dataset manifests: pinned sources, checksums and expected counts of one benchmark."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import DataError


@dataclass(frozen=True)
class SourceFile:
    """One raw file, pinned to ``repo @ commit : path`` with its SHA-256."""

    name: str
    repo: str
    commit: str
    path: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    title: str
    mirror_dir: str
    layout: str
    expected: dict[str, int]
    paper: dict[str, int]
    files: dict[str, SourceFile]


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest YAML (see ``datasets/*.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "manifest not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(path, f"not valid YAML: {error}") from None
    required = ("name", "title", "mirror_dir", "layout", "expected", "files")
    missing = [key for key in required if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise DataError(path, f"manifest lacks {', '.join(missing)}")
    files = {}
    for name, entry in raw["files"].items():
        fields = ("repo", "commit", "path", "sha256")
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in fields):
            raise DataError(path, f"file entry {name!r} needs string fields {', '.join(fields)}")
        files[name] = SourceFile(name=name, **{k: entry[k] for k in fields})
    return Manifest(
        name=raw["name"],
        title=raw["title"],
        mirror_dir=raw["mirror_dir"],
        layout=raw["layout"],
        expected={k: int(v) for k, v in raw["expected"].items()},
        paper={k: int(v) for k, v in (raw.get("paper") or {}).items()},
        files=files,
    )
