"""`download`: bring one benchmark into the canonical form of data/<dataset>/."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.data import DEFAULT_SOURCE_URL, import_dataset, load_manifest
from pipeline.errors import ConfigError
from stages import PARAMS_OPTION, app, load_params

MANIFESTS = Path(__file__).resolve().parent.parent / "datasets"
MIRROR_ENV = "MMRNS_DATA_MIRROR"


def manifest_path(dataset: str) -> Path:
    path = MANIFESTS / f"{dataset.lower()}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in MANIFESTS.glob("*.yaml")))
        raise ConfigError(f"unknown dataset {dataset!r}; valid: {valid}")
    return path


@app.command()
def download(
    dataset: str = typer.Argument(..., help="mkg-w, mkg-y or db15k"),
    mirror: Optional[Path] = typer.Option(None, help=f"Read files from MIRROR/<MKG-W|MKG-Y|DB15K>/ instead of the network (default: ${MIRROR_ENV})."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: data/<dataset>)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Fetch a benchmark (pinned sources or a mirror), verify checksums and counts, write the canonical tables."""
    manifest = load_manifest(manifest_path(dataset))
    settings = load_params(params, "download")
    drop = settings.get("drop_leaked_valid", True)
    if not isinstance(drop, bool):
        raise ConfigError(f"download.drop_leaked_valid must be true or false, got {drop!r}")
    mirror = mirror or (Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None)
    out = out or Path("data") / manifest.name
    report = import_dataset(
        manifest,
        out,
        mirror=mirror,
        url_template=settings.get("source_url", DEFAULT_SOURCE_URL),
        timeout=float(settings.get("timeout", 30.0)),
        drop_leaked=drop,
    )
    counts = report["counts"]
    typer.echo(
        f"{manifest.name}: {counts['entities']} entities, {counts['relations']} relations, "
        f"{counts['train']}/{counts['valid']}/{counts['test']} train/valid/test, "
        f"{len(report['defects'])} defect kinds -> {out}"
    )
