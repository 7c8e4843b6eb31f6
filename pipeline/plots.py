"""Training curves: CSV rows for ``dvc plots`` and a matplotlib PNG."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from pipeline.atomic import atomic_path  # noqa: E402


def write_csv(path: str | Path, rows: list[dict[str, float]], columns: list[str]) -> None:
    """Rows as CSV with a header, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_training_curves(path: str | Path, history: list[dict[str, float]], losses: list[dict[str, float]]) -> None:
    """PNG with the training loss (per log window and per validation) and VALID MRR / Hits@10."""
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if losses:
        loss_axis.plot([r["step"] for r in losses], [r["loss"] for r in losses], lw=0.8, label="loss (log window)")
    if history:
        steps = [r["step"] for r in history]
        loss_axis.plot(steps, [r["loss"] for r in history], "o-", label="loss (since last validation)")
        metric_axis.plot(steps, [r["valid_mrr"] for r in history], "o-", label="valid MRR")
        metric_axis.plot(steps, [r["valid_hits@10"] for r in history], "s-", label="valid Hits@10")
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    metric_axis.set(xlabel="step", ylabel="filtered, realistic", title="validation", ylim=(0, None))
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
