"""The sweep's leaderboard: a Markdown table, the rows as JSON, and a plot of every trial's val-loss curve.

Use it like this (as `chatforge.train.sweep` does)::

    write_leaderboard(out_dir, rows, counts)      # OUT/leaderboard.md, .json, .png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend, PNG through Agg

from chatforge.train.monitor import read_metrics


def describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


def write_leaderboard(out: Path, rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    """OUT/leaderboard.md (a table), .json (the rows) and .png (val-loss curves and best val loss per trial)."""
    keys = list(rows[0]["params"]) if rows else []
    (out / "leaderboard.json").write_text(json.dumps({"counts": counts, "trials": rows}, indent=2) + "\n")
    header = ["rank", "trial", *keys, "best val loss", "steps", "stopped early", "seconds", "run dir", "note"]
    summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    lines = [f"# Sweep leaderboard: {out.name}", "", f"{summary}. Ranked by best val loss (lower is better).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        loss = f"{row['best_val_loss']:.4f}" if row["best_val_loss"] is not None else "n/a"
        run_dir = Path(row["run_dir"]).name if row["run_dir"] and Path(row["run_dir"]).exists() else ""
        note = row["error"] or ("" if row["state"] == "complete" else row["state"])
        cells = [str(rank) if row["state"] == "complete" else "-", str(row["trial"]),
                 *(str(row["params"][key]) for key in keys), loss, str(row["steps"] or ""),
                 {True: "yes", False: "no"}.get(row["stopped_early"], ""), str(row["seconds"] or ""), run_dir, note]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n")
    plot_leaderboard(out / "leaderboard.png", rows)


def plot_leaderboard(path: Path, rows: list[dict[str, Any]]) -> None:
    """Left: val loss over steps of every finished trial (best in bold). Right: best val loss per trial, best on top."""
    finished = [row for row in rows if row["state"] == "complete" and row["best_val_loss"] is not None]
    figure = Figure(figsize=(13, max(4.5, 1.5 + 0.3 * len(finished))), layout="constrained")
    curves, bars = figure.subplots(1, 2)
    for rank, row in enumerate(finished):
        points = [(m["step"], m["val/loss"]) for m in read_metrics(Path(row["run_dir"])) if "val/loss" in m]
        if points:  # the run dir of a trial trained on another machine may not be here
            steps, losses = zip(*points)
            curves.plot(steps, losses, marker=".", color=f"C{rank % 10}", linewidth=3 if rank == 0 else 1,
                        alpha=1 if rank == 0 else 0.7, label=f"{'best: ' if rank == 0 else ''}trial {row['trial']}")
    curves.set(title="val loss per trial", xlabel="step", ylabel="val loss")
    if not finished:
        curves.text(0.5, 0.5, "no finished trial yet", ha="center", transform=curves.transAxes)
    else:
        if len(finished) <= 12:
            curves.legend(fontsize="small")
        losses = [row["best_val_loss"] for row in finished]
        labels = [shorten(f"trial {row['trial']}: {describe(row['params'])}", 60) for row in finished]
        bars.barh(labels[::-1], losses[::-1], color=[f"C{rank % 10}" for rank in range(len(finished))][::-1])
        spread = (max(losses) - min(losses)) or abs(min(losses)) * 0.05 or 1.0
        bars.set_xlim(min(losses) - 0.15 * spread, max(losses) + 0.15 * spread)  # the differences, not the zero
        bars.tick_params(axis="y", labelsize="small")
    bars.set(title="best val loss (lower is better)", xlabel="val loss")
    figure.savefig(path, dpi=100)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
