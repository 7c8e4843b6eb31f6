"""`predict`: ask a trained model for the top-k heads or tails of a query, by name.

One query: ``--head NAME --relation NAME`` (tails) or ``--relation NAME --tail NAME``
(heads), printed as Markdown or, with ``--json``, as JSON. Batch: ``--queries FILE.tsv``
(``head<TAB>relation<TAB>tail``, ``?`` for the asked side) answered into ``--out``
(``.parquet`` or ``.tsv``). Names are entity/relation keys or labels, matched ignoring case.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import DataError
from stages import DATA_OPTION, PARAMS_OPTION, app, load_params, resolve_dataset


def dataset_paths(dataset: Optional[str], data: Optional[Path], checkpoint: Optional[Path], params: Path) -> tuple[str, Path, Path]:
    """``(dataset, data directory, checkpoint)``: the evaluate stage's defaults (models/<dataset>/best.pt)."""
    dataset, data = resolve_dataset(dataset, params, data)
    checkpoint = checkpoint or Path("models") / dataset / "best.pt"
    if not checkpoint.is_file():
        raise DataError(checkpoint, "missing checkpoint (run the train stage first, or pass --checkpoint)")
    return dataset, data, checkpoint


@app.command()
def predict(
    dataset: Optional[str] = typer.Argument(None, help="mkg-w, mkg-y or db15k (default: the first of params.yaml `datasets`)."),
    head: Optional[str] = typer.Option(None, help="Head entity (key or label): ask for tails."),
    relation: Optional[str] = typer.Option(None, help="Relation (key or label)."),
    tail: Optional[str] = typer.Option(None, help="Tail entity (key or label): ask for heads."),
    top: int = typer.Option(10, min=1, help="Answers per query."),
    filtered: bool = typer.Option(False, "--filtered", help="Leave out answers that are known TRAIN/VALID/TEST facts (default: flag them)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of Markdown."),
    queries: Optional[Path] = typer.Option(None, help="Batch: TSV of queries head<TAB>relation<TAB>tail, '?' for the asked side."),
    out: Optional[Path] = typer.Option(None, help="Batch: answer file, .parquet or .tsv (one row per query and answer)."),
    batch_size: int = typer.Option(256, min=1, help="Batch: queries scored together."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (default: models/<dataset>/best.pt)."),
    data: Optional[Path] = DATA_OPTION,
    progress: bool = typer.Option(True, help="Batch: show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Top-k completions of (HEAD, RELATION, ?) or (?, RELATION, TAIL) from a trained model."""
    if queries is not None:
        if out is None or head or relation or tail or as_json:
            raise typer.BadParameter("batch mode takes --queries with --out, and none of --head/--relation/--tail/--json")
    elif relation is None or (head is None) == (tail is None) or out is not None:
        raise typer.BadParameter("give --relation with exactly one of --head (tail query) and --tail (head query), or --queries with --out")
    import torch

    from pipeline.predict import Predictor
    from pipeline.training import resolve_device

    dataset, directory, checkpoint = dataset_paths(dataset, data, checkpoint, params)
    threads = load_params(params, "train").get("threads") or 0
    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor.load(checkpoint, directory, resolve_device(load_params(params, "train").get("device", "auto")))
    if queries is not None:
        count = predictor.answer_file(queries, out, top, filtered, batch_size, progress)
        typer.echo(f"predict: {count} queries, top {top} each{' (filtered)' if filtered else ''} -> {out}")
        return
    answer = predictor.ask(relation, head=head, tail=tail, top=top, filtered=filtered)
    if as_json:
        typer.echo(json.dumps({"dataset": dataset, "checkpoint": str(checkpoint), "model": type(predictor.model).__name__, **answer.as_dict()}, indent=2))
    else:
        typer.echo(f"{type(predictor.model).__name__} on {dataset} ({checkpoint})\n\n{answer.markdown()}")
