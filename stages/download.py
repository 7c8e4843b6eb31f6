"""`download`: bring one benchmark into the canonical form of data/<dataset>/.

Source order: ``--mirror`` > ``$MMRNS_DATA_MIRROR`` > the xz-compressed copy embedded in
``datasets/<dataset>/`` (MKG-W, DB15K) > the pinned public sources (repository @ commit)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import ConfigError
from stages import DATASETS_DIR, PARAMS_OPTION, app, check_keys, dataset_name, load_params

MIRROR_ENV = "MMRNS_DATA_MIRROR"
DOWNLOAD_KEYS = ("drop_leaked_valid", "source_url", "timeout")


def embedded_copy(dataset: str) -> Path | None:
    """The folder of the dataset's embedded ``<file>.xz`` copy, if the repository ships one."""
    folder = DATASETS_DIR / dataset
    return folder if folder.is_dir() and any(folder.glob("*.xz")) else None


@app.command()
def download(
    dataset: str = typer.Argument(..., help="mkg-w, mkg-y or db15k"),
    mirror: Optional[Path] = typer.Option(None, help=f"Read files from MIRROR/<MKG-W|MKG-Y|DB15K>/ (default: ${MIRROR_ENV}, else the embedded copy, else the network)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: data/<dataset>)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Fetch a benchmark (mirror, embedded copy or pinned sources), verify checksums and counts, write the canonical tables."""
    from pipeline.data import DEFAULT_SOURCE_URL, import_dataset, load_manifest

    dataset = dataset_name(dataset)
    manifest = load_manifest(DATASETS_DIR / f"{dataset}.yaml")
    settings = check_keys("download", load_params(params, "download"), DOWNLOAD_KEYS)
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
        embedded=embedded_copy(manifest.name),
    )
    counts = report["counts"]
    typer.echo(
        f"{manifest.name} (from {mirror or report['source']}): {counts['entities']} entities, {counts['relations']} relations, "
        f"{counts['train']}/{counts['valid']}/{counts['test']} train/valid/test, "
        f"{len(report['defects'])} defect kinds -> {out}"
    )
