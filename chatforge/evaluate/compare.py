"""`chatforge compare RUN_OR_EVAL...`: the metrics of several runs, ensembles and their baselines in one table and plot.

Use it like this::

    result = compare([Path("runs/r1"), Path("runs/soup/eval/test")], out=Path("reports/cmp"))
    console.print(result.table())       # rich table, best values per metric in bold green
    result.to_markdown()                # the same table as Markdown (what OUT/compare.md holds)
    result.rows[0].name, result.rows[0].metrics["bleu"]

Each path is an eval dir (it holds metrics.json) or a run dir, whose newest RUN/eval/*/metrics.json is used. Each
eval's baseline (e.g. the base model) becomes a row of its own, once per baseline model, data and split. With `out`
the function writes OUT/compare.md, OUT/compare.json and OUT/compare.png: one panel per metric shared by every row,
one bar per row, each panel on its own scale (BLEU is 0-100, the other text scores 0-1, perplexity unbounded).
`warnings` says when the rows were scored on different data, so their numbers are not like for like.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from chatforge.core.rundir import RunDir
from chatforge.evaluate.plots import compare_png
from chatforge.evaluate.report import format_value, load_eval, metric_direction, order_metrics


@dataclass
class CompareRow:
    name: str                   # RUN/NAME for an eval, "baseline: MODEL" for a baseline
    path: Path                  # the eval dir the numbers come from
    kind: str                   # the run kind (adapter, full, ensemble, ...) or "baseline (KIND)"
    data: str                   # "DATA split SPLIT (N examples)"
    metrics: dict[str, float]


@dataclass
class CompareResult:
    rows: list[CompareRow]
    metric_names: list[str]     # every metric any row has, in the report's order
    shared_metrics: list[str]   # the metrics every row has: the ones plotted
    warnings: list[str] = field(default_factory=list)

    def best_rows(self, metric: str) -> set[int]:
        """Indexes of the rows with the best value of `metric`; empty when all are equal or it has no direction."""
        direction = metric_direction(metric)
        values = {index: row.metrics[metric] * direction for index, row in enumerate(self.rows)
                  if isinstance(row.metrics.get(metric), (int, float)) and math.isfinite(row.metrics[metric])}
        if not direction or len(set(values.values())) < 2:
            return set()
        return {index for index, value in values.items() if value == max(values.values())}

    def to_markdown(self) -> str:
        header = ["metric", *(row.name for row in self.rows)]
        lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |", "|" + "---|" * len(header)]
        for metric in self.metric_names:
            best = self.best_rows(metric)
            cells = [f"**{format_value(row.metrics.get(metric))}**" if index in best else
                     format_value(row.metrics.get(metric)) for index, row in enumerate(self.rows)]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        sources = [f"- **{row.name}**: {row.kind}; {row.data}; {row.path}" for row in self.rows]
        notes = [f"> {warning}" for warning in self.warnings]
        legend = "Best value per metric in bold, ties all bold (lower is better for loss and perplexity)."
        return "\n".join(["# Compare", "", *notes, *([""] if notes else []), *lines, "", legend, "", *sources]) + "\n"

    def table(self) -> Any:
        """A rich Table: one row per metric, one column per run; the best values per metric in bold green."""
        table = Table(title="compare", caption=escape("; ".join(self.warnings)) or None)
        table.add_column("metric")
        for row in self.rows:
            table.add_column(escape(row.name), justify="right")  # names are paths: "[" must not read as markup
        for metric in self.metric_names:
            best = self.best_rows(metric)
            table.add_row(metric, *(f"[bold green]{format_value(row.metrics.get(metric))}[/]" if index in best
                                    else format_value(row.metrics.get(metric)) for index, row in enumerate(self.rows)))
        return table

    def to_json(self) -> dict[str, Any]:
        return {"rows": [{"name": row.name, "path": str(row.path), "kind": row.kind, "data": row.data,
                          "metrics": row.metrics} for row in self.rows],
                "metrics": self.metric_names, "shared_metrics": self.shared_metrics, "warnings": self.warnings}


def resolve_eval_dir(path: Path) -> Path:
    """`path` itself when it holds metrics.json, else the run dir's newest eval/*/metrics.json's dir."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or eval dir")
    if (path / RunDir.EVAL_METRICS_FILE).is_file():
        return path
    run = RunDir(path)
    evals = run.eval_metrics_files()
    if not evals:
        raise FileNotFoundError(f"{path}: neither an eval dir (no {RunDir.EVAL_METRICS_FILE}) nor a run dir with evals "
                                f"(no {run.evals_dir}/*/{RunDir.EVAL_METRICS_FILE}); run `chatforge eval {path}` first")
    return evals[-1].parent


def eval_label(eval_dir: Path, info: dict[str, Any]) -> str:
    """RUN/NAME for RUN/eval/NAME, else the dir's own name."""
    if RunDir.is_eval_dir(eval_dir):
        return f"{eval_dir.parent.parent.name}/{eval_dir.name}"
    return str(info.get("name") or eval_dir.name)


def compare(paths: list[Path], out: Path | None = None, baselines: bool = True) -> CompareResult:
    """Rows for each run/eval dir in `paths` (+ each distinct baseline); with `out`, write compare.md/.json/.png."""
    if not paths:
        raise ValueError("compare needs at least one run or eval dir")
    eval_dirs = [resolve_eval_dir(path) for path in paths]
    seen: dict[Path, Path] = {}
    for path, eval_dir in zip(paths, eval_dirs):
        if eval_dir.resolve() in seen:
            raise ValueError(f"{path}: the same eval as {seen[eval_dir.resolve()]} ({eval_dir}); give each once")
        seen[eval_dir.resolve()] = path
    rows: list[CompareRow] = []
    baseline_rows: dict[tuple[str, str], CompareRow] = {}
    for eval_dir in eval_dirs:
        info, _ = load_eval(eval_dir)
        examples = format_value(info.get("n_examples"))
        data = f"{info.get('data', 'n/a')} split {info.get('split', 'n/a')} ({examples} examples)"
        rows.append(CompareRow(eval_label(eval_dir, info), eval_dir, str(info.get("run_kind", "unknown")), data,
                               dict(info["metrics"])))
        baseline = info.get("baseline")
        if baselines and baseline and isinstance(baseline.get("metrics"), dict):
            model = str(baseline.get("model", "baseline"))
            baseline_rows.setdefault((model, data), CompareRow(
                f"baseline: {Path(model).name or model}", eval_dir, f"baseline ({baseline.get('kind', 'unknown')})",
                data, dict(baseline["metrics"])))
    rows += baseline_rows.values()
    names = [row.name for row in rows]
    for row in rows:
        if names.count(row.name) > 1:  # two runs both called r1 in different folders: tell them apart by path
            row.name = f"{row.name} ({row.path})"
    metric_names = order_metrics({name for row in rows for name in row.metrics})
    shared = [name for name in metric_names if all(name in row.metrics for row in rows)]
    warnings = []
    if len({row.data for row in rows}) > 1:
        warnings.append("the rows were scored on different data: " +
                        "; ".join(f"{row.name}: {row.data}" for row in rows) + ". Their numbers are not like for like.")
    result = CompareResult(rows, metric_names, shared, warnings)
    if out is not None:
        write_comparison(result, out)
    return result


def write_comparison(result: CompareResult, out: Path) -> None:
    """OUT/compare.md, OUT/compare.json and OUT/compare.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(result.to_markdown() + "\n![one panel per metric](compare.png)\n", encoding="utf-8")
    (out / "compare.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    values = {metric: [row.metrics.get(metric) for row in result.rows] for metric in result.shared_metrics}
    directions = {metric: metric_direction(metric) for metric in result.shared_metrics}
    (out / "compare.png").write_bytes(compare_png([row.name for row in result.rows], values, directions))
