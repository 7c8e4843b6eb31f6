"""The paper's Table 2 as data, its grid of runs, and the report that sets our numbers beside it.

Grid (issue 15): datasets x models x samplers, TransE / DistMult / ComplEx with all seven
samplers (Uniform, Bernoulli, KBGAN, NSCaching, SANS, NS-KGE, MMRNS) and RotatE / PairRE /
GC-OTE with Uniform, SANS, MMRNS. Each :class:`Cell` is one experiment whose parameter
overrides (:func:`overrides`) select the dataset, model, sampler and the loss the sampler's own
paper trains with:

- Uniform, SANS, MMRNS, and every cell of RotatE / PairRE / GC-OTE: the self-adversarial
  negative-sampling loss (RotatE code; SANS builds on it, MMRNS uses it);
- Bernoulli, NSCaching, KBGAN: the margin loss for TransE (TransH/NSCaching "pair" loss,
  KBGAN's discriminator), the plain logistic NS loss (``nssa`` without self-adversarial
  weights) for DistMult / ComplEx (NSCaching's "point" loss);
- NS-KGE: its own non-sampling loss (``train.loss`` unused).

DB15K takes margin 6 (paper); DistMult / ComplEx validate every 500 steps (they peak early).
:func:`collect` reads ``dvc exp show --json`` (any DVC 3 nesting) and keeps, per cell, the
newest experiment with evaluation metrics; :func:`render_markdown` / :func:`render_csv` give
Table 2's shape (MRR, MR, H1, H3, H10 per dataset; ours beside the paper's in every cell, best
and second of each model block marked on our numbers, missing runs shown as missing).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

DATASETS = ("mkg-w", "mkg-y", "db15k")
DATASET_TITLES = {"mkg-w": "MKG-W", "mkg-y": "MKG-Y", "db15k": "MMKB-DB15K"}
MODELS = ("TransE", "DistMult", "ComplEx", "RotatE", "PairRE", "GC-OTE")
ALL_SAMPLERS = ("uniform", "bernoulli", "kbgan", "nscaching", "sans", "ns-kge", "mmrns")
SELF_ADVERSARIAL_MODEL_SAMPLERS = ("uniform", "sans", "mmrns")  # RotatE, PairRE, GC-OTE rows
SAMPLER_TITLES = {
    "uniform": "Uniform", "bernoulli": "Bernoulli", "kbgan": "KBGAN", "nscaching": "NSCaching",
    "sans": "SANS", "ns-kge": "NS-KGE", "mmrns": "MMRNS",
}
METRICS = ("mrr", "mr", "hits@1", "hits@3", "hits@10")
METRIC_TITLES = {"mrr": "MRR", "mr": "MR", "hits@1": "H1", "hits@3": "H3", "hits@10": "H10"}
LOWER_IS_BETTER = {"mr"}

#: Table 2 of the paper: model, sampler, then MRR MR H1 H3 H10 for MKG-W | MKG-Y | DB15K
#: (percent, MR in ranks), as published (NS-KGE DistMult MKG-Y MRR 4.05 included).
PAPER_ROWS = """
TransE uniform 29.19 1067 21.06 33.20 44.23 30.73 1987 23.45 35.18 43.37 24.86 675 12.78 31.48 47.07
TransE bernoulli 28.98 1184 22.99 31.48 40.11 31.12 1896 25.69 35.09 39.20 30.11 736 19.04 36.74 49.86
TransE kbgan 24.21 1450 14.51 30.74 40.45 26.92 2220 19.90 32.02 37.69 24.00 729 5.47 39.72 50.36
TransE nscaching 28.90 1106 22.24 32.22 40.97 29.91 1897 24.78 33.01 38.27 33.03 813 23.31 38.74 50.29
TransE sans 30.22 489 23.64 32.78 42.64 27.51 846 21.65 30.46 38.44 26.33 602 13.87 33.65 48.80
TransE ns-kge 28.50 911 19.77 32.80 44.27 31.58 1441 24.76 35.73 43.63 24.18 722 13.21 29.44 44.28
TransE mmrns 33.51 926 26.25 36.79 47.11 34.81 1791 28.59 38.71 44.76 26.61 663 13.40 34.58 50.60
DistMult uniform 20.99 1147 15.93 22.28 30.86 25.04 2646 19.33 27.80 35.95 23.03 814 14.78 26.28 39.59
DistMult bernoulli 25.76 1663 21.02 27.42 34.77 32.47 4069 29.63 33.81 37.10 27.05 1040 20.04 30.13 40.37
DistMult kbgan 19.11 2141 7.69 27.23 37.44 14.82 3507 0.51 27.41 34.55 23.36 985 16.43 25.34 36.30
DistMult nscaching 24.70 1631 20.34 26.01 32.74 32.55 4160 29.80 34.62 37.31 26.38 1182 19.33 29.63 39.74
DistMult sans 23.21 1334 18.46 24.41 32.20 27.52 3328 22.34 30.76 37.24 24.72 1257 16.82 28.23 39.76
DistMult ns-kge 25.67 1938 20.85 27.01 35.00 4.05 3867 31.35 35.58 38.62 23.62 1259 16.64 26.23 37.34
DistMult mmrns 25.92 1084 19.73 27.99 38.20 32.78 3481 27.99 36.06 41.13 22.80 864 14.06 26.32 40.42
ComplEx uniform 24.93 1114 19.09 26.69 36.73 28.71 2645 22.26 32.12 40.93 27.48 757 18.37 31.57 45.37
ComplEx bernoulli 27.14 1547 22.50 28.51 36.16 33.21 4167 30.42 35.00 38.11 30.68 1062 24.20 33.50 43.15
ComplEx kbgan 20.78 2054 9.92 28.44 38.13 16.99 3094 3.09 28.93 36.17 19.53 1292 9.25 32.02 42.39
ComplEx nscaching 27.12 1521 22.55 28.52 35.66 31.94 4107 29.03 33.91 37.01 30.17 1149 23.57 33.13 42.62
ComplEx sans 26.73 1485 21.81 28.11 36.23 27.30 3818 22.45 30.35 36.27 28.94 1440 21.10 32.80 43.57
ComplEx ns-kge 28.65 1405 23.40 30.58 38.37 34.43 3447 30.24 37.32 41.62 27.14 991 20.42 29.67 40.24
ComplEx mmrns 28.98 1112 22.69 31.32 41.26 31.98 3245 25.63 35.29 42.28 27.25 943 17.25 31.93 45.50
RotatE uniform 33.67 1169 26.80 36.68 46.73 34.95 2427 29.10 38.35 45.30 29.28 714 17.87 36.12 49.66
RotatE sans 33.32 768 27.35 35.66 44.67 35.28 1404 29.77 38.45 44.93 30.51 641 19.13 37.19 50.72
RotatE mmrns 34.13 1144 27.37 37.48 46.82 35.93 2504 30.53 39.07 45.47 29.67 708 17.89 36.66 51.01
PairRE uniform 34.40 823 28.24 36.71 46.04 32.01 1821 25.53 35.84 43.89 31.12 597 21.62 35.91 49.30
PairRE sans 32.73 936 27.02 34.54 43.47 32.79 1650 26.71 36.37 43.54 31.16 621 21.48 36.23 49.32
PairRE mmrns 35.03 843 28.59 37.49 47.47 34.96 1870 29.18 38.34 44.87 31.92 614 22.45 36.84 50.01
GC-OTE uniform 33.92 1057 26.55 35.96 46.05 32.95 1938 26.77 36.44 44.08 31.85 620 22.11 36.52 51.18
GC-OTE mmrns 34.32 1006 27.14 36.82 47.01 33.38 2381 27.65 36.78 43.44 32.68 641 23.01 37.86 50.96
"""


@dataclass(frozen=True, order=True)
class Cell:
    """One run of the grid."""

    dataset: str
    model: str
    sampler: str


def paper_table() -> dict[Cell, dict[str, float]]:
    """The paper's numbers per cell: ``{metric: value}`` (percent; MR in ranks)."""
    table = {}
    for line in PAPER_ROWS.strip().splitlines():
        model, sampler, *values = line.split()
        for index, dataset in enumerate(DATASETS):
            table[Cell(dataset, model, sampler)] = dict(zip(METRICS, map(float, values[5 * index : 5 * index + 5])))
    return table


def samplers_of(model: str) -> tuple[str, ...]:
    """The samplers Table 2 runs with ``model``."""
    return ALL_SAMPLERS if model in ("TransE", "DistMult", "ComplEx") else SELF_ADVERSARIAL_MODEL_SAMPLERS


def grid(datasets: Iterable[str] = DATASETS, models: Iterable[str] = MODELS, samplers: Iterable[str] = ALL_SAMPLERS) -> list[Cell]:
    """The cells of Table 2 restricted to ``datasets``, ``models`` and ``samplers`` (in table order)."""
    chosen = set(samplers)
    return [Cell(d, m, s) for d in datasets for m in models for s in samplers_of(m) if s in chosen]


def overrides(cell: Cell) -> dict[str, Any]:
    """params.yaml overrides (dotted keys) of one cell's experiment; see the module docstring."""
    values: dict[str, Any] = {"datasets": [cell.dataset], "train.model": cell.model, "sampler.name": cell.sampler}
    own_pair_loss = cell.sampler in ("bernoulli", "nscaching", "kbgan")
    if own_pair_loss and cell.model == "TransE":
        values.update({"train.loss": "margin", "train.self_adversarial": False})
    elif own_pair_loss:
        values.update({"train.loss": "nssa", "train.self_adversarial": False})
    else:
        values.update({"train.loss": "nssa", "train.self_adversarial": True})
    if cell.dataset == "db15k":
        values["train.gamma"] = 6.0
    if cell.model in ("DistMult", "ComplEx"):
        values["train.valid_every"] = 500
    return values


def experiment_name(cell: Cell) -> str:
    """``t2-<dataset>-<model>-<sampler>``, lower case (a valid DVC experiment name)."""
    return f"t2-{cell.dataset}-{cell.model}-{cell.sampler}".lower()


def override_arguments(cell: Cell) -> list[str]:
    """``-S key=value`` arguments of ``dvc exp run`` for one cell (Hydra override syntax)."""
    def text(value: Any) -> str:
        if isinstance(value, list):
            return "[" + ",".join(map(str, value)) + "]"
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [argument for key, value in overrides(cell).items() for argument in ("-S", f"{key}={text(value)}")]


# -- collecting experiments ------------------------------------------------------------------
def _records(node: Any) -> Iterator[dict]:
    """Every experiment/commit entry of ``dvc exp show --json`` (nested at any depth) that
    carries a ``data`` mapping with params, except unfinished experiments: a queued or running
    one is shown with ``data.rev == "workspace"`` under its own rev and the workspace's metric
    files, which are not its results."""
    if isinstance(node, list):
        for item in node:
            yield from _records(item)
    elif isinstance(node, dict):
        data = node.get("data")
        unfinished = isinstance(data, dict) and data.get("rev") == "workspace" and node.get("rev") != "workspace"
        if isinstance(data, dict) and "params" in data and not unfinished:
            yield {"name": node.get("name") or data.get("name"), "data": data}
        for value in node.values():
            if isinstance(value, (list, dict)) and value is not data:
                yield from _records(value)


def _dotted(mapping: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def collect(experiments: Any) -> dict[Cell, dict[str, Any]]:
    """Our result per cell from ``dvc exp show --json``: ``{metric: value (percent; MR in
    ranks), "experiment": name}``. Per cell the newest experiment with metrics wins, one named
    by :func:`experiment_name` before any other."""
    found: dict[Cell, tuple[tuple, dict]] = {}
    for record in _records(experiments):
        data = record["data"]
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        datasets, model, sampler = params.get("datasets"), _dotted(params, "train.model"), _dotted(params, "sampler.name")
        if not (isinstance(datasets, list) and len(datasets) == 1 and model and sampler):
            continue
        cell = Cell(str(datasets[0]), str(model), str(sampler).lower())
        metrics_file = (data.get("metrics") or {}).get(f"metrics/{cell.dataset}/evaluate.json", {}).get("data")
        if not metrics_file or any(metric not in metrics_file for metric in METRICS):
            continue
        values = {m: float(metrics_file[m]) * (1 if m in LOWER_IS_BETTER else 100) for m in METRICS}
        values["experiment"] = record["name"] or str(data.get("rev", ""))[:7]
        priority = (record["name"] == experiment_name(cell), str(data.get("timestamp") or ""))
        if cell not in found or priority > found[cell][0]:
            found[cell] = (priority, values)
    return {cell: values for cell, (_, values) in found.items()}


# -- rendering -------------------------------------------------------------------------------
def ranks_in_blocks(results: dict[Cell, dict[str, Any]], cells: list[Cell]) -> dict[tuple[Cell, str], int]:
    """``(cell, metric) -> 1 | 2`` for the best and second of our values within each
    (dataset, model) block; ties share a place."""
    marks = {}
    for dataset in {c.dataset for c in cells}:
        for model in {c.model for c in cells}:
            block = [c for c in cells if c.dataset == dataset and c.model == model and c in results]
            for metric in METRICS:
                sign = 1 if metric in LOWER_IS_BETTER else -1
                distinct = sorted({sign * results[c][metric] for c in block})
                for cell in block:
                    place = distinct.index(sign * results[cell][metric]) + 1
                    if place <= 2:
                        marks[(cell, metric)] = place
    return marks


def _number(metric: str, value: float) -> str:
    return f"{value:.0f}" if metric in LOWER_IS_BETTER else f"{value:.2f}"


def render_markdown(results: dict[Cell, dict[str, Any]], cells: list[Cell]) -> str:
    """Table 2's shape: a row per model and sampler, MRR MR H1 H3 H10 per dataset; each cell
    ``ours (paper)``; ours **best** / _second_ within its model block; ``missing`` when not run."""
    paper, marks = paper_table(), ranks_in_blocks(results, cells)
    datasets = [d for d in DATASETS if any(c.dataset == d for c in cells)]
    rows = sorted({(MODELS.index(c.model), ALL_SAMPLERS.index(c.sampler)) for c in cells})
    header = ["Model", "Sampler"] + [f"{DATASET_TITLES[d]} {METRIC_TITLES[m]}" for d in datasets for m in METRICS]
    lines = [
        "# Table 2: ours (paper)",
        "",
        "Filtered test metrics, realistic ranks, both directions; MRR and Hits in percent. Each cell: our run "
        "(the paper's number). **Bold**: our best within the model block, _italic_: our second; `missing`: "
        "no finished experiment. Collected by `python -m stages report` from `dvc exp show`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for model_index, sampler_index in rows:
        model, sampler = MODELS[model_index], ALL_SAMPLERS[sampler_index]
        fields = [model, SAMPLER_TITLES[sampler]]
        for dataset in datasets:
            cell = Cell(dataset, model, sampler)
            for metric in METRICS:
                reference = paper.get(cell, {}).get(metric)
                reference_text = f" ({_number(metric, reference)})" if reference is not None else ""
                if cell not in results:
                    fields.append(f"missing{reference_text}" if cell in cells else "")
                    continue
                ours = _number(metric, results[cell][metric])
                mark = {1: f"**{ours}**", 2: f"_{ours}_"}.get(marks.get((cell, metric)), ours)
                fields.append(mark + reference_text)
        lines.append("| " + " | ".join(fields) + " |")
    return "\n".join(lines) + "\n"


def render_csv(results: dict[Cell, dict[str, Any]], cells: list[Cell]) -> str:
    """One row per model and sampler; per dataset and metric our value (empty when missing),
    the paper's, and our place in the block (1, 2 or empty); plus the experiment names."""
    paper, marks = paper_table(), ranks_in_blocks(results, cells)
    datasets = [d for d in DATASETS if any(c.dataset == d for c in cells)]
    columns = ["model", "sampler"]
    for dataset in datasets:
        for metric in METRICS:
            columns += [f"{dataset}_{metric}", f"{dataset}_{metric}_paper", f"{dataset}_{metric}_place"]
        columns.append(f"{dataset}_experiment")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for model, sampler in sorted({(c.model, c.sampler) for c in cells}, key=lambda ms: (MODELS.index(ms[0]), ALL_SAMPLERS.index(ms[1]))):
        row: list[Any] = [model, sampler]
        for dataset in datasets:
            cell = Cell(dataset, model, sampler)
            ours = results.get(cell)
            for metric in METRICS:
                row += [
                    "" if ours is None else round(ours[metric], 2),
                    paper.get(cell, {}).get(metric, ""),
                    marks.get((cell, metric), ""),
                ]
            row.append("" if ours is None else ours["experiment"])
        writer.writerow(row)
    return buffer.getvalue()
