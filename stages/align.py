"""`align`: join crawl results to the entities -> media/<dataset>/entities_media.parquet,
and the coverage report reports/<dataset>/coverage.json."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages import DATA_OPTION, PARAMS_OPTION, app, check_keys, load_params, resolve_dataset


@app.command()
def align(
    dataset: str = typer.Argument(..., help="mkg-w, mkg-y or db15k"),
    data: Optional[Path] = DATA_OPTION,
    crawl_dir: Optional[Path] = typer.Option(None, "--crawl", help="Crawl directory (default: crawl/<dataset>)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: media/<dataset>)."),
    report: Optional[Path] = typer.Option(None, help="Coverage report JSON (default: reports/<dataset>/coverage.json)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Pick description sentences (label fallback) and seeded image choices per entity."""
    from dataclasses import fields

    from pipeline.align import AlignConfig, align as run_align, write_media
    from pipeline.atomic import write_json
    from pipeline.crawl import read_entities

    dataset, data = resolve_dataset(dataset, params, data)
    section = check_keys("align", load_params(params, "align"), [field.name for field in fields(AlignConfig)])
    config = AlignConfig.from_params(section)
    crawl_dir = crawl_dir or Path("crawl") / dataset
    out = out or Path("media") / dataset
    table, coverage = run_align(read_entities(data / "entities.parquet"), crawl_dir / "manifest.sqlite",
                                crawl_dir / "images", config)
    write_media(table, out / "entities_media.parquet")
    write_json(report or Path("reports") / dataset / "coverage.json", coverage)
    typer.echo(f"align {dataset}: " + ", ".join(f"{key} {value}" for key, value in coverage.items()))
