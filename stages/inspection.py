"""`inspect`: a sampler's negatives for one query beside the model's top answers (paper Fig. 7).

    python -m stages inspect mkg-w --checkpoint models/mkg-w/best.pt --test-row 0 [--side head|tail] [--top 10] [--html page.html]
    python -m stages inspect mkg-w --triple "Linda Darnell|place of birth|Dallas"

Markdown on stdout; ``--html`` writes one self-contained page (images embedded). The logic is
in :mod:`pipeline.inspection`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import PipelineError
from stages import DATA_OPTION, PARAMS_OPTION, app, load_params


@app.command("inspect")
def inspect_negatives(
    dataset: Optional[str] = typer.Argument(None, help="mkg-w, mkg-y or db15k (default: the first of params.yaml `datasets`)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (default: models/<dataset>/best.pt; its sampler state, or that of last.pt beside it, is used)."),
    triple: Optional[str] = typer.Option(None, help='The query as "HEAD|RELATION|TAIL" (keys or labels, any case).'),
    test_row: Optional[int] = typer.Option(None, "--test-row", help="The query as row N (0-based) of the TEST split."),
    side: str = typer.Option("tail", help="The corrupted / asked side: head or tail."),
    top: int = typer.Option(10, min=1, help="Entities per list."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page here."),
    draws: int = typer.Option(20000, min=100, help="Samplers without a closed-form distribution (KBGAN, NSCaching, SANS): negatives drawn to estimate it."),
    features: Optional[Path] = typer.Option(None, help="Feature caches text/ and visual/ (default: features/<dataset>)."),
    media: Optional[Path] = typer.Option(None, help="Descriptions and images table (default: media/<dataset>/entities_media.parquet)."),
    images: Optional[Path] = typer.Option(None, help="Image store (default: crawl/<dataset>/images)."),
    data: Optional[Path] = DATA_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """The sampler's top-k negatives by probability and the model's top-k by filtered score for one query, with media."""
    if (triple is None) == (test_row is None):
        raise typer.BadParameter("give exactly one of --triple HEAD|RELATION|TAIL and --test-row N")
    if side not in ("head", "tail"):
        raise typer.BadParameter(f"--side must be head or tail, got {side!r}")
    import torch

    from pipeline.atomic import atomic_path
    from pipeline.inspection import Inspector
    from pipeline.training import resolve_device
    from stages.predict import dataset_paths

    dataset, directory, checkpoint = dataset_paths(dataset, data, checkpoint, params)
    train, sampler = load_params(params, "train"), load_params(params, "sampler")
    torch.set_num_threads(train.get("threads") or torch.get_num_threads())
    inspector = Inspector.load(
        checkpoint, directory, train, sampler, features or Path("features") / dataset,
        media or Path("media") / dataset / "entities_media.parquet", images or Path("crawl") / dataset / "images",
        resolve_device(train.get("device", "auto")),
    )
    query = inspector.parse_triple(triple) if triple is not None else inspector.test_row(test_row)
    result = inspector.inspect(query, side, top, draws)  # type: ignore[arg-type]
    typer.echo(result.markdown())
    if html is not None:
        if html.is_dir():
            raise PipelineError(f"--html {html}: is a directory; give a file name")
        with atomic_path(html) as tmp:
            tmp.write_text(result.html(), encoding="utf-8")
        typer.echo(f"inspect: HTML page -> {html}", err=True)
