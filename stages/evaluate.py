"""`evaluate`: filtered test evaluation of the best checkpoint of the `train` stage.

Reads models/<ds>/best.pt and data/<ds>/; writes metrics/evaluate.json (realistic MR, MRR,
Hits@1/3/10 over both directions at the top level, then per rank type, direction and
relation category) and plots/evaluate_categories.png. Runs on `train.device`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.atomic import write_json
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import evaluate as evaluate_model
from pipeline.evaluation_report import metrics_payload, plot_categories
from pipeline.graph import load_graph
from pipeline.training import BEST, load_model, resolve_device
from stages import DATA_OPTION, PARAMS_OPTION, app, load_params


def check_evaluate_section(section: Any) -> dict[str, Any]:
    """Validate the ``evaluate`` section (ConfigError naming the key)."""
    if not isinstance(section, dict):
        raise ConfigError(f"evaluate must be a mapping, got {section!r}")
    batch_size = section.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"evaluate.batch_size must be a positive integer, got {batch_size!r}")
    return section


@app.command()
def evaluate(
    dataset: Optional[str] = typer.Argument(None, help="mkg-w, mkg-y or db15k (default: params.yaml `dataset`)."),
    data: Optional[Path] = DATA_OPTION,
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to evaluate (default: models/<dataset>/best.pt)."),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="Metrics JSON."),
    plot: Path = typer.Option(Path("plots/evaluate_categories.png"), help="Per-category bar chart (PNG)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Filtered ranking of every test triple (head and tail) against all entities."""
    every = load_params(params)
    dataset = dataset or every.get("dataset")
    if not dataset:
        raise ConfigError(f"{params}: no dataset given and no top-level `dataset`")
    settings = check_evaluate_section(load_params(params, "evaluate"))
    device = resolve_device(load_params(params, "train").get("device", "auto"))
    checkpoint = checkpoint or Path("models") / str(dataset) / BEST
    if not checkpoint.is_file():
        raise DataError(checkpoint, "missing checkpoint (run the train stage first)")
    graph = load_graph(data or Path("data") / str(dataset))
    model = load_model(checkpoint, graph, device)
    started = time.perf_counter()
    results = evaluate_model(model, graph, "test", batch_size=settings["batch_size"], progress=progress)
    seconds = time.perf_counter() - started
    write_json(metrics, metrics_payload(results))
    headline = results["realistic"]["both"]
    plot_categories(plot, results, f"{type(model).__name__} on {dataset} test: filtered, both directions")
    typer.echo(
        f"evaluate: {type(model).__name__} on {dataset} test ({results['num_triples']} triples, both directions, "
        f"realistic ranks): MRR {headline['mrr']:.4f}, Hits@1 {headline['hits@1']:.4f}, Hits@3 {headline['hits@3']:.4f}, "
        f"Hits@10 {headline['hits@10']:.4f}, MR {headline['mr']:.1f}; {seconds:.2f} s on {device} -> {metrics}, {plot}"
    )
