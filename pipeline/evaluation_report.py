"""What the evaluate stage writes from :func:`pipeline.evaluation.evaluate`'s metrics: the
headline JSON for ``dvc metrics show`` and a bar chart of the relation categories."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from pipeline.atomic import atomic_path  # noqa: E402
from pipeline.evaluation import METRICS  # noqa: E402

CHART_METRICS = ("mrr", "hits@10")


def metrics_payload(metrics: dict) -> dict:
    """The headline for ``dvc metrics show`` / ``dvc exp show``: realistic ranks, both
    directions (``mr``, ``mrr``, ``hits@k``). The detail is :func:`~pipeline.evaluation.evaluate`'s
    whole result, written as a separate report."""
    return {name: metrics["realistic"]["both"][name] for name in METRICS}


def plot_categories(path: str | Path, metrics: dict, title: str) -> None:
    """PNG bar chart: MRR and Hits@10 (realistic, both directions) overall and per relation category."""
    categories = metrics.get("categories", {})
    groups = [("all", metrics["realistic"]["both"])] + [(name, values["both"]) for name, values in categories.items()]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(CHART_METRICS)
    for offset, name in enumerate(CHART_METRICS):
        positions = [index + (offset - (len(CHART_METRICS) - 1) / 2) * width for index in range(len(groups))]
        values = [group[name] for _, group in groups]
        bars = axis.bar(positions, values, width, label=name.upper().replace("HITS", "Hits"))
        axis.bar_label(bars, labels=[f"{value:.3f}" for value in values], fontsize=8)
    axis.set_xticks(range(len(groups)), [label for label, _ in groups])
    axis.set(ylabel="filtered, realistic rank", ylim=(0, 1), title=title)
    if not categories:
        axis.set_xlabel("(no relation categories in this graph)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
