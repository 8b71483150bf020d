"""The eval report's and `compare`'s plots, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Use it like this::

    png = loss_curves_png(train_points=[(1, 2.3), (2, 2.1)], val_points=[(2, 2.2)])
    (eval_dir / "report_loss.png").write_bytes(png)
    html_src = data_uri(png)                               # "data:image/png;base64,..." for an <img src>
    scores_png({"rougeL": [0.1, 0.4]}, {"rougeL": [0.0, 0.2]})   # run vs baseline histograms, one panel per score
    compare_png(["r1", "r2"], {"bleu": [12.0, 15.5], "perplexity": [8.2, 7.9]}, {"bleu": 1, "perplexity": -1})

No pyplot: figures are plain `matplotlib.figure.Figure`s on an Agg canvas, so nothing global is switched and the
functions are safe to call from any thread.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # no pyplot: no global backend, PNG through Agg
from matplotlib.patches import Patch

RUN_COLOUR, BASELINE_COLOUR = "#4063d8", "#cb3c33"


def figure_png(figure: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib Figure, rendered by the Agg canvas."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A `data:` URL embedding the PNG, for a self-contained <img>."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def loss_curves_png(train_points: Sequence[tuple[float, float]], val_points: Sequence[tuple[float, float]]) -> bytes:
    """Train loss (thin line, with a moving average when noisy) and val loss (markers, best one ringed) over steps."""
    figure = Figure(figsize=(8, 3.6), layout="constrained")
    axes = figure.subplots()
    if train_points:
        steps, losses = zip(*train_points)
        window = max(1, len(losses) // 20)
        axes.plot(steps, losses, color=RUN_COLOUR, linewidth=1, alpha=0.4 if window > 1 else 1, label="train loss")
        if window > 1:
            averaged = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                        for i in range(len(losses))]
            axes.plot(steps, averaged, color=RUN_COLOUR, linewidth=2, label=f"train loss ({window}-step mean)")
    if val_points:
        steps, losses = zip(*val_points)
        axes.plot(steps, losses, color=BASELINE_COLOUR, marker="o", markersize=4, label="val loss")
        best_step, best_loss = min(val_points, key=lambda point: point[1])
        axes.scatter([best_step], [best_loss], s=120, facecolors="none", edgecolors="black", zorder=3,
                     label=f"best val {best_loss:.4g} @ step {best_step:g}")
    axes.set(title="training run: loss over steps", xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure_png(figure)


def scores_png(run_scores: dict[str, list[float]], baseline_scores: dict[str, list[float]] | None) -> bytes:
    """One histogram panel per score (values in 0-1): the run's per-sample scores, the baseline's overlaid."""
    figure = Figure(figsize=(4.2 * len(run_scores), 3.4), layout="constrained")
    panels = figure.subplots(1, len(run_scores), squeeze=False)[0]
    bins = [i / 20 for i in range(21)]
    for axes, (name, values) in zip(panels, run_scores.items()):
        axes.hist(values, bins=bins, color=RUN_COLOUR, alpha=0.6, label=f"run (mean {_mean(values):.3f})")
        if baseline_scores and baseline_scores.get(name):
            base_values = baseline_scores[name]
            axes.hist(base_values, bins=bins, color=BASELINE_COLOUR, alpha=0.45,
                      label=f"baseline (mean {_mean(base_values):.3f})")
        axes.set(title=f"per-sample {name}", xlabel=name, ylabel="samples", xlim=(0, 1))
        axes.legend(fontsize="small")
    return figure_png(figure)


def compare_png(names: Sequence[str], values_by_metric: dict[str, list[float | None]],
                directions: dict[str, int] | None = None) -> bytes:
    """One panel per metric (own y scale: BLEU 0-100, rates 0-1, perplexity unbounded), one bar per run.

    `directions` maps a metric to -1 (lower is better), +1 (higher is better) or 0 (neither) for the panel titles.
    """
    metrics = list(values_by_metric) or ["(no shared metric)"]
    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(3.2 * columns + 0.5, 2.9 * rows + 0.6), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{index % 10}" for index in range(len(names))]
    for axes, metric in zip(panels, metrics):
        values = values_by_metric.get(metric)
        if values is None:
            axes.text(0.5, 0.5, "no metric shared by all inputs", ha="center", transform=axes.transAxes)
            axes.set_axis_off()
            continue
        heights = [value if value is not None and math.isfinite(value) else 0.0 for value in values]
        bars = axes.bar(range(len(names)), heights, color=colours)
        for bar, value in zip(bars, values):
            label = "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"
            axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                          fontsize="x-small", xytext=(0, 2), textcoords="offset points")
        better = {-1: " (lower is better)", 1: " (higher is better)"}.get((directions or {}).get(metric, 0), "")
        axes.set_title(metric + better, fontsize="small")
        axes.set_xticks([])
        axes.margins(y=0.15)
    for axes in panels[len(metrics):]:
        axes.set_axis_off()
    handles = [Patch(color=colour, label=name) for colour, name in zip(colours, names)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(4, max(1, len(names))), fontsize="small")
    return figure_png(figure)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
