"""The paper's Fig. 4, 5 and 6 as grids of DVC experiments and PNG plots of their metrics.

- Fig. 4 (KGC hyper-parameter sensitivity, MKG-W): TransE and DistMult, every Table 2 sampler
  of those models (:data:`pipeline.table2.ALL_SAMPLERS`), embedding dim in {50, 100, 200, 400}
  at the default learning rate and learning rate in {1e-4, 5e-4, 1e-3, 5e-3} at the default dim
  (the paper does not print its learning rates: these bracket our default 1e-3); MRR and
  Hits@10, one curve per sampler.
- Fig. 5 (MMRNS parameters): TransE + MMRNS on MKG-W, eps0 in {1, 3, 5, 10} at the default
  beta and beta in {0.1, 0.01, 0.005, 0.003} at the default eps0 (the paper's grid).
- Fig. 6 (ablations): TransE + MMRNS on MKG-W and MKG-Y, full / w/o KCA / w/o CSS / w/o Rel.

Every point is a :class:`Point`: params overrides = the Table 2 cell's (:func:`pipeline.table2.overrides`,
so each sampler trains under its own paper's loss) plus the varied key; the keys other figures
vary (:data:`HELD`) and the shared hyper-parameters its model uses (:data:`MODEL_HELD`: the N3 weight of
DistMult, not of TransE) stay at their params.yaml value ("default"), and an MMRNS point also needs the
rest of ``sampler.mmrns`` at its params.yaml value (:func:`requirements`). :func:`collect` reads
``dvc exp show --json`` and gives each point the experiments whose params equal all of its
overrides (an experiment made any other way counts too, so a Table 2 run is the default
point of every curve) and whose training budget (:data:`BUDGET`) is the figure's: all points of
a figure take runs of one budget, that of the runs off the default point (the swept values;
the default point alone decides only when nothing else was run), and runs of several budgets
there are an error naming them (choose one with ``given``, the ``--budget`` option), never
averaged (:func:`figure_budget`). Per ``train.seed`` the newest wins (one named by the recipe
first), and a point run with several seeds shows mean and standard deviation. Metrics: test
MRR and Hits@10 of ``metrics/<ds>/evaluate.json``, in percent.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import ConfigError
from pipeline.models import SHARED_KEYS, uses
from pipeline.table2 import ALL_SAMPLERS, SAMPLER_TITLES, Cell, _dotted, _records, override_arguments, overrides

FIGURES = ("fig4", "fig5", "fig6")
FIG4_MODELS = ("TransE", "DistMult")
FIG4_DIMS = (50, 100, 200, 400)
FIG4_LRS = (1e-4, 5e-4, 1e-3, 5e-3)
FIG5_EPS0 = (1, 3, 5, 10)
FIG5_BETA = (0.1, 0.01, 0.005, 0.003)
ABLATIONS = ("none", "no_kca", "no_css", "no_rel")
ABLATION_TITLES = {"none": "MMRNS (full)", "no_kca": "w/o KCA", "no_css": "w/o CSS", "no_rel": "w/o Rel"}
FIG6_DATASETS = ("mkg-w", "mkg-y")
METRICS = ("mrr", "hits@10")
METRIC_TITLES = {"mrr": "MRR (%)", "hits@10": "Hits@10 (%)"}
PARAM_TITLES = {"train.dim": "embedding dimension", "train.lr": "learning rate", "sampler.mmrns.eps0": "eps0 (eq. 15)",
                "sampler.mmrns.beta": "beta (eq. 14)"}


@dataclass(frozen=True)
class Point:
    """One configuration of a figure: which panel/curve it belongs to and its x value."""

    figure: str  # fig4 | fig5 | fig6
    cell: Cell  # dataset, model, sampler (its Table 2 overrides)
    parameter: str  # the varied params key (dotted), e.g. train.dim
    value: Any  # its value at this point

    def overrides(self) -> dict[str, Any]:
        values = overrides(self.cell)
        values[self.parameter] = self.value
        return values

    def name(self) -> str:
        """``f4-mkg-w-transe-uniform-dim50``-style experiment name (lower case)."""
        prefix = {"train.dim": "dim", "train.lr": "lr", "sampler.mmrns.eps0": "eps0-", "sampler.mmrns.beta": "beta-"}
        tag = self.value.replace("_", "-") if isinstance(self.value, str) else f"{prefix[self.parameter]}{self.value:g}"
        return f"f{self.figure[-1]}-{self.cell.dataset}-{self.cell.model}-{self.cell.sampler}-{tag}".lower()


def points(figure: str, samplers: Iterable[str] = ALL_SAMPLERS, models: Iterable[str] = FIG4_MODELS) -> list[Point]:
    """The points of one figure (Fig. 4 restricted to ``samplers`` and ``models``)."""
    if figure == "fig4":
        chosen = set(samplers)
        out = []
        for model in models:
            for sampler in (s for s in ALL_SAMPLERS if s in chosen):
                cell = Cell("mkg-w", model, sampler)
                out += [Point("fig4", cell, "train.dim", dim) for dim in FIG4_DIMS]
                out += [Point("fig4", cell, "train.lr", lr) for lr in FIG4_LRS]
        return out
    if figure == "fig5":
        cell = Cell("mkg-w", "TransE", "mmrns")
        return [Point("fig5", cell, "sampler.mmrns.eps0", e) for e in FIG5_EPS0] + [Point("fig5", cell, "sampler.mmrns.beta", b) for b in FIG5_BETA]
    if figure == "fig6":
        return [Point("fig6", Cell(d, "TransE", "mmrns"), "sampler.mmrns.ablation", a) for d in FIG6_DATASETS for a in ABLATIONS]
    raise ValueError(f"unknown figure {figure!r}; valid: {', '.join(FIGURES)}")


#: Keys a figure varies; on every other figure's points they are held at the params.yaml value (and queued explicitly).
HELD = ("train.dim", "train.lr", "sampler.mmrns.eps0", "sampler.mmrns.beta", "sampler.mmrns.ablation")
#: The other shared model hyper-parameters (``train.gamma``, ``train.regularization``), held at their params.yaml
#: value for the points whose model uses them.
MODEL_HELD = tuple(f"train.{key}" for key in SHARED_KEYS if f"train.{key}" not in HELD)
#: The training budget (``--set`` at queue time): one value each over a figure's runs (:func:`figure_budget`);
#: ``sampler.mmrns.warm_start`` bears on MMRNS runs only.
BUDGET = ("train.steps", "train.valid_every", "train.patience", "sampler.mmrns.warm_start")


def defaults_from(params: dict[str, Any]) -> dict[str, Any]:
    """The held values of a params.yaml mapping: ``train.dim``, ``train.lr``, :data:`MODEL_HELD` and every key of
    ``sampler.mmrns`` but the budget's (an MMRNS point must match the whole section but for its varied key, so a
    variant run never counts as the paper's setting)."""
    values = {key: _dotted(params, key) for key in ("train.dim", "train.lr", *MODEL_HELD)}
    values.update({f"sampler.mmrns.{key}": value for key, value in ((params.get("sampler") or {}).get("mmrns") or {}).items()
                   if f"sampler.mmrns.{key}" not in BUDGET})
    return values


def budget_of(point: Point, params: dict[str, Any]) -> dict[str, Any]:
    """An experiment's values of the :data:`BUDGET` keys that bear on ``point`` (``None`` when absent)."""
    return {key: _dotted(params, key) for key in BUDGET if not key.startswith("sampler.mmrns.") or point.cell.sampler == "mmrns"}


def parse_budget(items: Iterable[str]) -> dict[str, int]:
    """``KEY=VALUE`` items (integer values of :data:`BUDGET` keys) as a mapping; ConfigError otherwise."""
    budget = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in BUDGET or not value.strip().isdigit():
            raise ConfigError(f"--budget {item!r}: expected KEY=INTEGER with KEY one of {', '.join(BUDGET)}")
        budget[key] = int(value)
    return budget


def describe(budget: dict[str, Any]) -> str:
    """``train.steps=3000 train.valid_every=500 ...``."""
    return " ".join(f"{key}={value}" for key, value in budget.items())


def requirements(point: Point, defaults: dict[str, Any]) -> dict[str, Any]:
    """Every params value an experiment must have to count for ``point``: its overrides and the
    ``defaults`` (:func:`defaults_from`) of the keys it does not vary (``sampler.mmrns.*`` for MMRNS points only,
    :data:`MODEL_HELD` keys for the models that use them)."""
    held = {key: value for key, value in defaults.items()
            if key != point.parameter and (not key.startswith("sampler.mmrns.") or point.cell.sampler == "mmrns")
            and (key not in MODEL_HELD or uses(point.cell.model, key.removeprefix("train.")))}
    return {**held, **point.overrides()}


def unique_runs(chosen: list[Point], defaults: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(experiment name, params to set)`` of the distinct configurations among ``chosen`` (a point
    shared by two curves, e.g. dim 200 at the default lr, runs once, under its first name)."""
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for point in chosen:
        values = {key: value for key, value in requirements(point, defaults).items() if key in HELD or key in MODEL_HELD or key in point.overrides()}
        canonical = repr(sorted((key, _canonical(v)) for key, v in values.items()))
        seen.setdefault(canonical, (point.name(), values))
    return list(seen.values())


def queue_arguments(name: str, values: dict[str, Any], seed: int | None, extra: list[str]) -> list[str]:
    """``dvc exp run --queue`` arguments of one run: the Table 2 cell's overrides, the held and varied
    keys, with ``seed`` also ``train.seed`` and ``sampler.seed`` (name suffix ``-s<seed>``), then ``extra`` ``key=value``."""
    cell = Cell(values["datasets"][0], values["train.model"], values["sampler.name"])
    arguments = ["exp", "run", "--queue", "--name", name if seed is None else f"{name}-s{seed}", *override_arguments(cell)]
    arguments += [argument for key, value in values.items() if key not in overrides(cell) for argument in ("-S", f"{key}={value}")]
    if seed is not None:
        arguments += ["-S", f"train.seed={seed}", "-S", f"sampler.seed={seed}"]
    for item in extra:
        arguments += ["-S", item]
    return arguments


# -- collecting -----------------------------------------------------------------------------
def _canonical(value: Any) -> Any:
    """``value`` with numbers as floats (5000 = 5e3), for sets and keys."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected == actual
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(float(expected), float(actual), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, str) and isinstance(actual, str):
        return expected.lower() == actual.lower()
    return expected == actual


@dataclass(frozen=True)
class Run:
    """An experiment with test metrics whose params meet a point's :func:`requirements`."""

    point: Point
    name: str
    seed: Any  # train.seed
    priority: tuple  # (named by the recipe, timestamp): the greatest per seed counts
    budget: dict[str, Any]  # :func:`budget_of`
    metrics: dict[str, float]  # percent


@dataclass(frozen=True)
class Result:
    """A point's metrics over its seeds (percent) and the training budget of its runs."""

    mean: dict[str, float]
    std: dict[str, float]  # 0 with one seed
    experiments: tuple[str, ...]
    budget: dict[str, Any]


def matches(shown: Any, chosen: list[Point], defaults: dict[str, Any]) -> list[Run]:
    """Every pair of a point of ``chosen`` and an experiment of ``dvc exp show --json`` output with
    test metrics whose params meet the point's :func:`requirements` (any budget)."""
    runs = []
    for record in _records(shown):
        data = record["data"]
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        datasets = params.get("datasets")
        if not (isinstance(datasets, list) and len(datasets) == 1):
            continue
        metrics = (data.get("metrics") or {}).get(f"metrics/{datasets[0]}/evaluate.json", {}).get("data") or {}
        if any(not isinstance(metrics.get(m), (int, float)) for m in METRICS):
            continue
        name = record["name"] or str(data.get("rev", ""))[:7]
        for point in chosen:
            if all(_same(value, _dotted(params, key) if key != "datasets" else datasets) for key, value in requirements(point, defaults).items()):
                runs.append(Run(point, name, _dotted(params, "train.seed"), (str(name).startswith(point.name()), str(data.get("timestamp") or "")),
                                budget_of(point, params), {m: 100 * float(metrics[m]) for m in METRICS}))
    return runs


def _fits(budget: dict[str, Any], chosen: dict[str, Any]) -> bool:
    return all(_same(value, budget[key]) for key, value in chosen.items() if key in budget)


def figure_budget(runs: list[Run], defaults: dict[str, Any], given: dict[str, int] | None = None) -> dict[str, Any]:
    """The one budget of a figure's ``runs`` (:func:`matches`): the ``given`` values, then each other
    :data:`BUDGET` key's value among the runs off the default point (the swept values), then among all
    runs (keys no swept run has, e.g. when only the default point was run). A key with several values
    there is a ConfigError naming the budgets found: runs of different budgets are never averaged."""
    budget = dict(given or {})
    swept = [run for run in runs if not _same(defaults.get(run.point.parameter), run.point.value)]
    for group in (swept, runs):
        fitting = [run for run in group if _fits(run.budget, budget)]
        for key in BUDGET:
            values = {_canonical(run.budget[key]): run.budget[key] for run in fitting if key in run.budget}
            if len(values) > 1:
                found: dict[str, list[str]] = {}
                for run in fitting:
                    found.setdefault(describe(run.budget), []).append(run.name)
                listed = "; ".join(f"{text} ({len(names)} runs, e.g. {names[0]})" for text, names in found.items())
                raise ConfigError(f"{fitting[0].point.figure}: its runs have {len(found)} training budgets: {listed}; "
                                  f"plot one with --budget KEY=VALUE, e.g. --budget {key}={next(iter(values.values()))}")
            if values:
                budget[key] = next(iter(values.values()))
    return budget


def panels(chosen: list[Point]) -> list[list[Point]]:
    """``chosen`` split by the PNG that plots them (Fig. 4: one per model): each is one figure with
    one training budget (:func:`collect`), so TransE and DistMult may be run for different budgets."""
    split: dict[tuple[str, str | None], list[Point]] = {}
    for point in chosen:
        split.setdefault((point.figure, point.cell.model if point.figure == "fig4" else None), []).append(point)
    return list(split.values())


def collect(shown: Any, chosen: list[Point], defaults: dict[str, Any], given: dict[str, int] | None = None) -> dict[Point, Result]:
    """The result of each point of ``chosen`` (one figure's: they share a budget) found in ``dvc exp
    show --json`` output: its :func:`matches` of the :func:`figure_budget` (see the module docstring)."""
    runs = matches(shown, chosen, defaults)
    budget = figure_budget(runs, defaults, given)
    newest: dict[Point, dict[Any, Run]] = {}
    for run in (run for run in runs if _fits(run.budget, budget)):
        seeds = newest.setdefault(run.point, {})
        if run.seed not in seeds or run.priority > seeds[run.seed].priority:
            seeds[run.seed] = run
    results = {}
    for point, seeds in newest.items():
        kept = list(seeds.values())
        results[point] = Result(
            mean={m: statistics.fmean(run.metrics[m] for run in kept) for m in METRICS},
            std={m: statistics.stdev(run.metrics[m] for run in kept) if len(kept) > 1 else 0.0 for m in METRICS},
            experiments=tuple(sorted(run.name for run in kept)),
            budget=kept[0].budget,
        )
    return results


# -- rendering ------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(axis, chosen: list[Point], results: dict[Point, Result], metric: str, label: str, style: str = "o-") -> bool:
    """One line (with seed std as error bars) of the points present in ``results``; False if none."""
    present = [p for p in chosen if p in results]
    if not present:
        return False
    xs = [p.value for p in present]
    axis.errorbar(xs, [results[p].mean[metric] for p in present], yerr=[results[p].std[metric] for p in present], fmt=style, capsize=3, label=label, markersize=4)
    return True


def _empty(axis) -> None:
    axis.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=axis.transAxes, color="grey")


def render_fig4(results: dict[Point, Result], chosen: list[Point], out: Path) -> list[Path]:
    """One PNG per model: rows dim / learning rate, columns MRR / Hits@10, a curve per sampler."""
    plt = _pyplot()
    written = []
    for model in dict.fromkeys(p.cell.model for p in chosen):
        figure, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
        for row, parameter in enumerate(("train.dim", "train.lr")):
            for column, metric in enumerate(METRICS):
                axis = axes[row][column]
                drawn = False
                for sampler in dict.fromkeys(p.cell.sampler for p in chosen):
                    curve = [p for p in chosen if p.cell.model == model and p.cell.sampler == sampler and p.parameter == parameter]
                    drawn |= _curve(axis, curve, results, metric, SAMPLER_TITLES[sampler])
                grid = FIG4_LRS if parameter == "train.lr" else FIG4_DIMS
                axis.set_xscale("log", base=10 if parameter == "train.lr" else 2)
                axis.set_xticks(grid, [f"{v:g}" for v in grid])
                axis.minorticks_off()
                axis.set_xlim(grid[0] / 1.3, grid[-1] * 1.3)
                axis.set_xlabel(PARAM_TITLES[parameter])
                axis.set_ylabel(METRIC_TITLES[metric])
                axis.set_title(f"{model} on MKG-W: {METRIC_TITLES[metric].split()[0]} vs {PARAM_TITLES[parameter]}")
                axis.grid(alpha=0.3)
                if drawn:
                    axis.legend(fontsize=8)
                else:
                    _empty(axis)
        figure.suptitle(f"Fig. 4: sensitivity to KGC hyper-parameters ({model}, MKG-W; test, filtered)")
        written.append(_save(figure, out / f"fig4_{model.lower()}.png"))
    return written


def render_fig5(results: dict[Point, Result], chosen: list[Point], out: Path) -> list[Path]:
    """eps0 and beta panels, MRR and Hits@10 lines."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, parameter in zip(axes, ("sampler.mmrns.eps0", "sampler.mmrns.beta")):
        curve = [p for p in chosen if p.parameter == parameter]
        drawn = [_curve(axis, curve, results, metric, METRIC_TITLES[metric].split()[0], style) for metric, style in zip(METRICS, ("o-", "s--"))]
        axis.set_xscale("log")
        values = [p.value for p in curve]
        axis.set_xticks(values, [f"{v:g}" for v in values])
        axis.minorticks_off()
        axis.set_xlabel(PARAM_TITLES[parameter])
        axis.set_ylabel("test metric (%)")
        axis.set_title(f"TransE + MMRNS on MKG-W: {PARAM_TITLES[parameter].split()[0]}")
        axis.grid(alpha=0.3)
        if any(drawn):
            axis.legend()
        else:
            _empty(axis)
    figure.suptitle("Fig. 5: MMRNS parameters (the other held at its default)")
    return [_save(figure, out / "fig5.png")]


def render_fig6(results: dict[Point, Result], chosen: list[Point], out: Path) -> list[Path]:
    """Grouped bars per dataset: metrics on x, one bar per variant; missing bars marked."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(p.cell.dataset for p in chosen))
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.5), squeeze=False)
    width = 0.8 / len(ABLATIONS)
    for axis, dataset in zip(axes[0], datasets):
        for k, ablation in enumerate(ABLATIONS):
            point = next(p for p in chosen if p.cell.dataset == dataset and p.value == ablation)
            xs = [m + (k - (len(ABLATIONS) - 1) / 2) * width for m in range(len(METRICS))]
            if point in results:
                heights = [results[point].mean[m] for m in METRICS]
                axis.bar(xs, heights, width, yerr=[results[point].std[m] for m in METRICS], capsize=3, label=ABLATION_TITLES[ablation])
            else:
                axis.bar(xs, [0] * len(METRICS), width, label=f"{ABLATION_TITLES[ablation]} (missing)")
                for x in xs:
                    axis.text(x, 0, "missing", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
        axis.set_xticks(range(len(METRICS)), [METRIC_TITLES[m] for m in METRICS])
        found = [results[p].mean[m] for p in chosen if p.cell.dataset == dataset and p in results for m in METRICS]
        axis.set_ylim(0, 1.2 * max(found) if found else 1)
        if not found:
            _empty(axis)
        axis.set_ylabel("test metric (%)")
        axis.set_title(f"TransE on {dataset.upper()}")
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("Fig. 6: ablations of MMRNS")
    return [_save(figure, out / "fig6.png")]


RENDERERS = {"fig4": render_fig4, "fig5": render_fig5, "fig6": render_fig6}


def _save(figure, path: Path) -> Path:
    """Save ``figure`` as PNG atomically and close it."""
    from pipeline.atomic import atomic_path

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    _pyplot().close(figure)
    return path


CSV_KEY = ("figure", "dataset", "model", "sampler", "parameter", "value")
CSV_COLUMNS = (*CSV_KEY, "mrr", "mrr_std", "hits@10", "hits@10_std", "seeds", "experiments", "budget")


def render_csv(results: dict[Point, Result], chosen: list[Point], previous: str = "") -> str:
    """The plotted numbers: one row per point (empty metrics when missing) with its runs' training budget.
    The rows of ``previous`` (the file as it was) stay in their place, those of ``chosen`` rewritten, so
    rendering one figure or model (``--figure``, ``--model``) leaves the others' numbers as they were;
    points new to the file come last."""
    import csv
    import io

    rendered = {}
    for p in chosen:
        r = results.get(p)
        numbers = ["", "", "", "", 0, "", ""] if r is None else [round(r.mean["mrr"], 2), round(r.std["mrr"], 2), round(r.mean["hits@10"], 2),
                                                                 round(r.std["hits@10"], 2), len(r.experiments), " ".join(r.experiments), describe(r.budget)]
        row = [p.figure, p.cell.dataset, p.cell.model, p.cell.sampler, p.parameter, p.value, *numbers]
        rendered[tuple(str(v) for v in row[:len(CSV_KEY)])] = row
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for old in csv.DictReader(io.StringIO(previous)):
        key = tuple(old.get(column, "") for column in CSV_KEY)
        writer.writerow(rendered.pop(key) if key in rendered else [old.get(column, "") for column in CSV_COLUMNS])
    for row in rendered.values():
        writer.writerow(row)
    return buffer.getvalue()
