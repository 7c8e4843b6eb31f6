"""`figures-queue` and `figures`: the paper's Fig. 4 (KGC hyper-parameters x samplers), Fig. 5
(MMRNS eps0 / beta) and Fig. 6 (ablations) as queued DVC experiments, and their PNG plots.

    python -m stages figures-queue [--figure fig5 ...] [--sampler uniform ...] [--model DistMult] [--seeds 3] [--set train.threads=1] [--dry-run]
    dvc queue start -j 1
    python -m stages figures [--budget train.steps=3000]   # -> plots/figures/fig4_transe.png, fig4_distmult.png, fig5.png, fig6.png, figures.csv

The grids, the matching of experiments to points and the plots are in :mod:`pipeline.figures`.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import ConfigError
from stages import PARAMS_OPTION, app, load_params
from stages.report import EXPERIMENTS_OPTION, LEDGER_OPTION, NO_LEDGER_OPTION, all_experiments, chosen, run_dvc

FIGURES = ("fig4", "fig5", "fig6")
FIGURE_OPTION = typer.Option(None, "--figure", help="fig4, fig5 or fig6 (repeatable; default: all three).")
SAMPLER_OPTION = typer.Option(None, "--sampler", help="Fig. 4 samplers (repeatable; default: all seven).")
MODEL_OPTION = typer.Option(None, "--model", help="Fig. 4 models (repeatable; default: TransE and DistMult).")


def selected_points(figure: Optional[list[str]], sampler: Optional[list[str]], model: Optional[list[str]] = None):
    """The points of the chosen figures (Fig. 4 narrowed to the chosen samplers and models)."""
    from pipeline import figures as module
    from pipeline.table2 import ALL_SAMPLERS

    samplers = chosen(sampler, ALL_SAMPLERS, "sampler")
    models = chosen(model, module.FIG4_MODELS, "model")
    return {name: module.points(name, samplers, models) for name in chosen(figure, FIGURES, "figure")}


@app.command("figures-queue")
def figures_queue(
    figure: Optional[list[str]] = FIGURE_OPTION,
    sampler: Optional[list[str]] = SAMPLER_OPTION,
    model: Optional[list[str]] = MODEL_OPTION,
    seeds: int = typer.Option(1, min=1, help="Runs per point with train.seed = sampler.seed = 1..N (1: the params.yaml seeds, no suffix)."),
    set_values: Optional[list[str]] = typer.Option(None, "--set", help="Extra KEY=VALUE for every run, e.g. train.steps=20000 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the dvc commands instead of queueing them."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Queue the runs of Fig. 4/5/6 as DVC experiments (f4-..., f5-..., f6-...); a configuration
    shared by several points or figures is queued once."""
    from pipeline import figures as module

    for item in set_values or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    defaults = module.defaults_from(load_params(params))
    runs = module.unique_runs([p for points in selected_points(figure, sampler, model).values() for p in points], defaults)
    count = 0
    for name, values in runs:
        for seed in ([None] if seeds == 1 else range(1, seeds + 1)):
            arguments = module.queue_arguments(name, values, seed, list(set_values or []))
            if dry_run:
                typer.echo("dvc " + shlex.join(arguments))
            else:
                run_dvc(arguments)
                typer.echo(f"queued {arguments[4]}")
            count += 1
    if not dry_run:
        typer.echo(f"{count} experiments queued; run them with `dvc queue start -j 1`, then `python -m stages figures`")


@app.command()
def figures(
    figure: Optional[list[str]] = FIGURE_OPTION,
    sampler: Optional[list[str]] = SAMPLER_OPTION,
    model: Optional[list[str]] = MODEL_OPTION,
    experiments: Optional[Path] = EXPERIMENTS_OPTION,
    out: Path = typer.Option(Path("plots/figures"), help="Directory of the PNGs and figures.csv."),
    budget: Optional[list[str]] = typer.Option(None, "--budget", help="KEY=VALUE of the training budget to plot when runs of several "
                                               "match a figure, e.g. train.steps=3000 (repeatable; default: the swept runs' one budget)."),
    params: Path = PARAMS_OPTION,
    ledger: Path = LEDGER_OPTION,
    no_ledger: bool = NO_LEDGER_OPTION,
) -> None:
    """Render Fig. 4, 5 and 6 as PNGs from the experiments' test metrics (missing runs are listed
    and left out of the plots; `dvc plots show` displays the PNGs). Each figure plots runs of one
    training budget (steps, validation, patience, MMRNS warm start): that of its swept runs, or
    `--budget`; runs of several budgets are an error naming them, never averaged."""
    from pipeline import figures as module
    from pipeline.atomic import atomic_path

    shown = all_experiments(experiments, ledger, no_ledger)
    defaults = module.defaults_from(load_params(params))
    given = module.parse_budget(budget or [])
    every = []
    for name, points in selected_points(figure, sampler, model).items():
        results, budgets = {}, []
        for panel in module.panels(points):  # one budget each
            found = module.collect(shown, panel, defaults, given)
            results.update(found)
            budgets.append(module.describe({key: value for result in found.values() for key, value in result.budget.items()}))
        written = module.RENDERERS[name](results, points, out)
        missing = [p for p in points if p not in results]
        plotted = "; ".join(dict.fromkeys(b for b in budgets if b))
        typer.echo(f"{name}: {len(points) - len(missing)} of {len(points)} points found{f' at {plotted}' if plotted else ''} -> {', '.join(map(str, written))}")
        if missing:
            listed = ", ".join(p.name() for p in missing[:12]) + (f", ... ({len(missing) - 12} more)" if len(missing) > 12 else "")
            typer.echo(f"{name}: missing {len(missing)}: {listed}; queue them with `python -m stages figures-queue --figure {name}`")
        every += [(p, results) for p in points]
    table_path = out / "figures.csv"
    previous = table_path.read_text() if table_path.exists() else ""
    table = module.render_csv({p: r[p] for p, r in every if p in r}, [p for p, _ in every], previous)
    with atomic_path(table_path) as tmp:
        tmp.write_text(table)
