"""`evaluate`: filtered test evaluation of the best checkpoint of the `train` stage.

Reads models/<ds>/best.pt and data/<ds>/; writes metrics/<ds>/evaluate.json (the headline:
realistic MR, MRR, Hits@1/3/10 over both directions), reports/<ds>/evaluate.json (every
rank type, direction and relation category) and plots/<ds>/evaluate_categories.png. Runs on
`train.device`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.errors import ConfigError, DataError
from stages import DATA_OPTION, PARAMS_OPTION, app, check_keys, load_params, resolve_dataset
from stages.launch import join_world
from stages.train import OPTIONAL


def check_evaluate_section(section: Any) -> dict[str, Any]:
    """Validate the ``evaluate`` section (ConfigError naming the key)."""
    check_keys("evaluate", section, ("batch_size",))
    batch_size = section.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"evaluate.batch_size must be a positive integer, got {batch_size!r}")
    return section


@app.command()
def evaluate(
    dataset: Optional[str] = typer.Argument(None, help="mkg-w, mkg-y or db15k (default: the first of params.yaml `datasets`)."),
    data: Optional[Path] = DATA_OPTION,
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to evaluate (default: models/<dataset>/best.pt)."),
    metrics: Optional[Path] = typer.Option(None, help="Headline metrics JSON (default: metrics/<dataset>/evaluate.json)."),
    report: Optional[Path] = typer.Option(None, help="Detailed report JSON (default: reports/<dataset>/evaluate.json)."),
    plot: Optional[Path] = typer.Option(None, help="Per-category bar chart (default: plots/<dataset>/evaluate_categories.png)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Filtered ranking of every test triple (head and tail) against all entities.

    Under ``torchrun --nproc_per_node N -m stages evaluate ...`` the test batches are shared out
    among the ranks (the same metrics as one process) and rank 0 writes.
    """
    from pipeline.atomic import write_json
    from pipeline.distributed import leave
    from pipeline.evaluation import evaluate as evaluate_model
    from pipeline.evaluation_report import metrics_payload, plot_categories
    from pipeline.graph import load_graph
    from pipeline.training import BEST, CHECKPOINT_FIX, load_model, resolve_device

    dataset, data = resolve_dataset(dataset, params, data)
    settings = check_evaluate_section(load_params(params, "evaluate"))
    train_section = load_params(params, "train")
    device = resolve_device(train_section.get("device", "auto"))
    checkpoint = checkpoint or Path("models") / dataset / BEST
    if not checkpoint.is_file():
        raise DataError(checkpoint, "missing checkpoint (run the train stage first)")
    graph = load_graph(data)
    world = join_world(device, train_section.get("dist_timeout", OPTIONAL["dist_timeout"]))
    try:
        model = load_model(checkpoint, graph, world.device, fix=CHECKPOINT_FIX.replace("DATASET", dataset))
        started = time.perf_counter()
        results = evaluate_model(model, graph, "test", batch_size=settings["batch_size"], progress=progress and world.is_main, world=world)
        seconds = time.perf_counter() - started
    finally:
        leave(world)
    if not world.is_main:
        return
    metrics = metrics or Path("metrics") / dataset / "evaluate.json"
    report = report or Path("reports") / dataset / "evaluate.json"
    plot = plot or Path("plots") / dataset / "evaluate_categories.png"
    write_json(metrics, metrics_payload(results))
    write_json(report, results)
    headline = results["realistic"]["both"]
    on_ranks = f" x {world.size} processes" if world.size > 1 else ""
    plot_categories(plot, results, f"{type(model).__name__} on {dataset} test: filtered, both directions")
    typer.echo(
        f"evaluate: {type(model).__name__} on {dataset} test ({results['num_triples']} triples, both directions, "
        f"realistic ranks): MRR {headline['mrr']:.4f}, Hits@1 {headline['hits@1']:.4f}, Hits@3 {headline['hits@3']:.4f}, "
        f"Hits@10 {headline['hits@10']:.4f}, MR {headline['mr']:.1f}; {seconds:.2f} s on {device}{on_ranks} -> {metrics}, {report}, {plot}"
    )
