"""`table2` and `report`: the paper's Table 2 grid as queued DVC experiments, and the table of
their results beside the paper's.

    python -m stages table2 [--dataset mkg-w ...] [--model TransE ...] [--sampler sans ...] [--dry-run] [--start]
    dvc queue start -j 1            # (or --start) run the queue; `dvc queue status` to follow
    python -m stages report         # -> reports/table2.md, reports/table2.csv

The grid, the per-sampler losses and the rendering are in :mod:`pipeline.table2`.
"""
from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import ConfigError
from stages import app


def chosen(values: Optional[list[str]], valid: tuple[str, ...], option: str) -> tuple[str, ...]:
    """``values`` checked against ``valid`` (case-insensitive for models), or all of ``valid``."""
    if not values:
        return valid
    lookup = {name.lower(): name for name in valid}
    unknown = [value for value in values if value.lower() not in lookup]
    if unknown:
        raise ConfigError(f"--{option}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    return tuple(lookup[value.lower()] for value in values)


EXPERIMENTS_OPTION = typer.Option(None, help="Saved `dvc exp show --json` output (default: run it now, all commits).")
LEDGER_OPTION = typer.Option(Path("reports/experiments.jsonl"), "--ledger", help="The experiment ledger kept in git (`experiments-save`), read beside the experiments.")
NO_LEDGER_OPTION = typer.Option(False, "--no-ledger", help="Read only --experiments (or `dvc exp show`), not the ledger.")


def run_dvc(arguments: list[str]) -> str:
    """Run ``dvc ARGUMENTS``; its stdout, or a ConfigError with its last stderr line."""
    finished = subprocess.run(["dvc", *arguments], capture_output=True, text=True)
    if finished.returncode != 0:
        last = (finished.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"dvc {' '.join(arguments[:2])} failed: {last}")
    return finished.stdout


def shown_experiments(experiments: Optional[Path]) -> object:
    """``dvc exp show --json --all-commits`` output, run now or read from ``experiments``."""
    raw = experiments.read_text() if experiments else run_dvc(["exp", "show", "--json", "--all-commits"])
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{experiments or 'dvc exp show --json'}: not JSON ({error})") from None


def all_experiments(experiments: Optional[Path], ledger: Path, no_ledger: bool) -> object:
    """The experiments a report or figure reads: ``dvc exp show`` (or ``experiments``) and the ledger."""
    from pipeline import ledger as ledger_module

    shown = shown_experiments(experiments)
    return shown if no_ledger else ledger_module.combined(ledger_module.read(ledger), shown)


@app.command("experiments-save")
def experiments_save(experiments: Optional[Path] = EXPERIMENTS_OPTION, ledger: Path = LEDGER_OPTION) -> None:
    """Add the finished DVC experiments (`dvc exp show --all-commits`) to the ledger kept in git
    (reports/experiments.jsonl: params and metrics, one run a line), so that `report` and `figures`
    rebuild the tables and plots on any clone; experiment refs stay on the machine that ran them."""
    from pipeline import ledger as ledger_module
    from pipeline.atomic import atomic_path

    found = ledger_module.finished(shown_experiments(experiments))
    records, added = ledger_module.merge(ledger_module.read(ledger), found)
    with atomic_path(ledger) as tmp:
        tmp.write_text(ledger_module.render(records))
    typer.echo(f"experiments-save: {added} new of {len(found)} finished experiments -> {ledger} ({len(records)} in all)")


@app.command()
def table2(
    dataset: Optional[list[str]] = typer.Option(None, help="Datasets of the grid (repeatable; default: mkg-w, mkg-y, db15k)."),
    model: Optional[list[str]] = typer.Option(None, help="Models (repeatable; default: all six)."),
    sampler: Optional[list[str]] = typer.Option(None, help="Samplers (repeatable; default: all seven)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the dvc commands instead of queueing them."),
    start: bool = typer.Option(False, "--start", help="Start one queue worker after queueing (dvc queue start -j 1)."),
) -> None:
    """Queue the Table 2 grid as DVC experiments t2-<dataset>-<model>-<sampler>, each with its
    sampler's own loss (see pipeline/table2.py)."""
    from pipeline import table2 as grid_module

    cells = grid_module.grid(
        chosen(dataset, grid_module.DATASETS, "dataset"), chosen(model, grid_module.MODELS, "model"), chosen(sampler, grid_module.ALL_SAMPLERS, "sampler")
    )
    if not cells:
        raise ConfigError("the chosen datasets, models and samplers select no Table 2 cell")
    for cell in cells:
        arguments = ["exp", "run", "--queue", "--name", grid_module.experiment_name(cell), *grid_module.override_arguments(cell)]
        if dry_run:
            typer.echo("dvc " + shlex.join(arguments))
        else:
            run_dvc(arguments)
            typer.echo(f"queued {grid_module.experiment_name(cell)}")
    if start and not dry_run:
        run_dvc(["queue", "start", "-j", "1"])
        typer.echo("started one queue worker; follow with `dvc queue status`, then run `python -m stages report`")
    elif not dry_run:
        typer.echo(f"{len(cells)} experiments queued; run them with `dvc queue start -j 1`, then `python -m stages report`")


@app.command()
def report(
    experiments: Optional[Path] = EXPERIMENTS_OPTION,
    out: Path = typer.Option(Path("reports"), help="Directory of table2.md and table2.csv."),
    dataset: Optional[list[str]] = typer.Option(None, help="Datasets of the table (repeatable; default: all three)."),
    ledger: Path = LEDGER_OPTION,
    no_ledger: bool = NO_LEDGER_OPTION,
) -> None:
    """Collect the experiments' test metrics into reports/table2.md and reports/table2.csv in
    Table 2's shape, ours beside the paper's."""
    from pipeline import table2 as grid_module
    from pipeline.atomic import atomic_path

    shown = all_experiments(experiments, ledger, no_ledger)
    cells = grid_module.grid(chosen(dataset, grid_module.DATASETS, "dataset"))
    results = {cell: values for cell, values in grid_module.collect(shown).items() if cell in set(cells)}
    for name, text in (("table2.md", grid_module.render_markdown(results, cells)), ("table2.csv", grid_module.render_csv(results, cells))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    typer.echo(f"report: {len(results)} of {len(cells)} Table 2 runs found -> {out / 'table2.md'}, {out / 'table2.csv'}")
