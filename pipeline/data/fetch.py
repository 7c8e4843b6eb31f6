"""Bring a manifest's raw files into a folder, from a mirror, an embedded (xz-compressed)
copy or the pinned sources, and verify every checksum before anything is parsed."""
from __future__ import annotations

import hashlib
import lzma
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from pipeline.data.manifest import Manifest, SourceFile
from pipeline.errors import DataError, PipelineError

DEFAULT_SOURCE_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
OFFLINE_HINT = "offline? point --mirror (or MMRNS_DATA_MIRROR) at a folder holding the files"
EMBEDDED_SUFFIX = ".xz"  # an embedded copy holds <file name>.xz for every file of the manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(source: SourceFile, path: Path, origin: str) -> None:
    actual = sha256_of(path)
    if actual != source.sha256:
        raise DataError(origin, f"SHA-256 mismatch for {source.name}: expected {source.sha256}, got {actual}")


def _download(source: SourceFile, url_template: str, target: Path, client: httpx.Client) -> str:
    url = url_template.format(repo=source.repo, commit=source.commit, path=source.path)
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise PipelineError(f"{url}: HTTP {response.status_code} for {source.name}; {OFFLINE_HINT}")
            size = response.headers.get("content-length")
            with target.open("wb") as handle, tqdm(total=int(size) if size and size.isdigit() else None, desc=source.name,
                                                   unit="B", unit_scale=True, leave=False) as bar:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    bar.update(len(chunk))
    except httpx.TransportError as error:
        host = urlsplit(url).netloc
        raise PipelineError(f"cannot reach {host} for {source.name} ({type(error).__name__}: {error}); {OFFLINE_HINT}") from None
    return url


def unpack_embedded(source: SourceFile, embedded: Path, target: Path) -> str:
    """Decompress ``embedded/<name>.xz`` to ``target``; returns the compressed file's path."""
    packed = embedded / (source.name + EMBEDDED_SUFFIX)
    if not packed.is_file():
        raise DataError(packed, f"missing file in the embedded copy (expected {source.name})")
    try:
        with lzma.open(packed) as reader, target.open("wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
    except lzma.LZMAError as error:
        raise DataError(packed, f"not a valid xz file ({error})") from None
    return str(packed)


def fetch_files(
    manifest: Manifest,
    scratch: Path,
    mirror: Path | None = None,
    url_template: str = DEFAULT_SOURCE_URL,
    timeout: float = 30.0,
    embedded: Path | None = None,
) -> dict[str, Path]:
    """Locate every file of ``manifest`` and verify its SHA-256: in ``mirror/<mirror_dir>/``
    if a mirror is given, else decompressed from ``embedded/<name>.xz`` into ``scratch`` if an
    embedded copy is given, else downloaded into ``scratch`` from its pinned source.
    Returns file name -> local path. Raises on the first problem."""
    paths: dict[str, Path] = {}
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for source in tqdm(manifest.files.values(), desc=f"fetch {manifest.name}", unit="file"):
            if mirror is not None:
                local = mirror / manifest.mirror_dir / source.name
                if not local.is_file():
                    raise DataError(local, f"missing file in mirror (expected {source.name} of {manifest.name})")
                origin = str(local)
            elif embedded is not None:
                local = scratch / source.name
                origin = unpack_embedded(source, embedded, local)
            else:
                local = scratch / source.name
                origin = _download(source, url_template, local, client)
            _verify(source, local, origin)
            paths[source.name] = local
    return paths
