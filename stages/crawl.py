"""`crawl`: gather descriptions and images of every entity into crawl/<dataset>/
(manifest.sqlite + the content-addressed images/ store). Resumes; see pipeline.crawl."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages import DATA_OPTION, PARAMS_OPTION, app, load_params, resolve_dataset


@app.command()
def crawl(
    dataset: str = typer.Argument(..., help="mkg-w, mkg-y or db15k"),
    data: Optional[Path] = DATA_OPTION,
    out: Optional[Path] = typer.Option(None, help="Crawl directory (default: crawl/<dataset>)."),
    source: str = typer.Option("web", help="web (the crawl.sources of params), local-folder or csv."),
    folder: Optional[Path] = typer.Option(None, help="With --source local-folder: images named by entity key."),
    manifest: Optional[Path] = typer.Option(None, help="With --source csv: CSV with columns key,image,description."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also retry failed items (unreachable ones are always retried)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Look up descriptions and images (DBpedia, Wikidata, Commons, or local files), verify and store them."""
    from pipeline.crawl import CrawlConfig, crawl as run_crawl, read_entities

    dataset, data = resolve_dataset(dataset, params, data)
    config = CrawlConfig.from_params(load_params(params, "crawl"))
    out = out or Path("crawl") / dataset
    summary = run_crawl(read_entities(data / "entities.parquet"), out / "manifest.sqlite", out / "images", config,
                        source=source, folder=folder, csv_manifest=manifest, retry_failed=retry_failed,
                        progress=progress)
    typer.echo(f"crawl {dataset}: {summary.line()}")
