"""`export`: a checkpoint's entity and relation embeddings for other tools.

Writes DIR/entities.npy, relations.npy (and contexts.npy for GC-OTE), metadata.tsv and
vectors.tsv (the Embedding Projector's pair: load both at projector.tensorflow.org),
relation_metadata.tsv, relation_vectors.tsv, projector_config.json, and export.json
(what each array holds for this model, the constants of its score function).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages import DATA_OPTION, PARAMS_OPTION, app
from stages.predict import dataset_paths


@app.command()
def export(
    dataset: Optional[str] = typer.Argument(None, help="mkg-w, mkg-y or db15k (default: the first of params.yaml `datasets`)."),
    out: Path = typer.Option(..., help="Directory to write (replaced if it holds an earlier export)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint (default: models/<dataset>/best.pt)."),
    data: Optional[Path] = DATA_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Entity and relation embeddings as .npy, plus Embedding Projector TSVs."""
    from pipeline.graph import load_graph
    from pipeline.predict import checkpoint_info, export_embeddings, load_names
    from pipeline.training import CHECKPOINT_FIX, load_model

    dataset, directory, checkpoint = dataset_paths(dataset, data, checkpoint, params)
    model = load_model(checkpoint, load_graph(directory), fix=CHECKPOINT_FIX.replace("DATASET", dataset))
    payload = export_embeddings(model, *load_names(directory), out, {"dataset": dataset, **checkpoint_info(checkpoint)})
    shapes = ", ".join(f"{name} {shape}" for name, shape in payload["files"].items())
    typer.echo(f"export: {payload['model']} on {dataset}: {shapes} -> {out}")
