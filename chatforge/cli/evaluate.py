"""`chatforge eval | compare | rate`: score runs, put them side by side, and let people rate them blind."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from chatforge.cli.common import app, console, fail, load_project, log_line
from chatforge.cli.options import ConfigOptions, config_option, field_option
from chatforge.config import ConfigError, EvalConfig, ServeConfig, merge_overrides
from chatforge.evaluate.compare import compare

# Imported inside the commands that need them: evaluate.run_eval imports torch (+8-10 s wall, 3 s CPU at startup),
# evaluate.rating and rating_app SQLAlchemy and FastAPI (+3 s wall, 1 s CPU); see cli/stages.py.

METRIC_ORDER = ["perplexity", "token_accuracy", "bleu", "rouge1", "rouge2", "rougeL", "token_f1", "exact_match",
                "stopped_rate", "mean_answer_tokens", "accuracy", "macro_f1", "loss"]


EVAL_OPTIONS = ConfigOptions(EvalConfig, [
    field_option("data"), field_option("baseline"), field_option("name"), field_option("split"),
    field_option("max_examples"), field_option("generation.max_new_tokens", "--max-new-tokens"),
    field_option("generation.temperature", "--temperature"), field_option("generation.top_p", "--top-p"),
    field_option("generation.batch_size", "--batch-size"), field_option("bias.enabled", "--bias"),
    field_option("device"),
])


@app.command("eval")
@EVAL_OPTIONS.add_to
def eval_command(
    run: Annotated[Path, typer.Argument(help="run directory (adapter, full model or ensemble)")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (default ./chatforge.yaml)")] = None,
    **options: Any,
) -> None:
    """Perplexity, BLEU/ROUGE/F1, labels, a bias probe and a baseline comparison; writes RUN/eval/NAME/report.html."""
    from chatforge.evaluate.run_eval import EvalError, evaluate_run  # lazy: torch

    try:
        cfg = merge_overrides(load_project(config).eval, EVAL_OPTIONS.overrides(options))
        report = evaluate_run(run, cfg, log=log_line)
    except (ConfigError, EvalError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    console.print(metric_table(report.metrics))
    bias_result = report.metrics.get("bias")
    if bias_result:
        console.print(f"bias probe: {bias_result['flagged_pairs']} of {bias_result['total_pairs']} pairs flagged")
    console.print(f"[bold green]report:[/] {report.report_html}", highlight=False)


def metric_table(metrics: dict[str, Any]) -> Table:
    """Run, baseline and delta per metric, in a fixed order."""
    baseline = (metrics.get("baseline") or {}).get("metrics", {})
    table = Table("metric", "run", *(["baseline", "delta"] if baseline else []))
    run_metrics = metrics["metrics"]
    for key in [k for k in METRIC_ORDER if k in run_metrics] + [k for k in run_metrics if k not in METRIC_ORDER]:
        row = [key, _fmt(run_metrics[key])]
        if baseline:
            delta = metrics["deltas"].get(key)
            row += [_fmt(baseline.get(key)), "" if delta is None else f"{delta:+.4g}"]
        table.add_row(*row)
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return escape(str(value))


@app.command("compare")
def compare_command(
    paths: Annotated[list[Path], typer.Argument(help="run dirs (their newest eval) or eval dirs (RUN/eval/NAME)")],
    out: Annotated[Path | None, typer.Option(help="write compare.md, compare.json and compare.png here")] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="add each eval's baseline as a row")] = True,
) -> None:
    """The metrics of several runs/ensembles (and their baselines) in one table and one plot."""
    try:
        result = compare(paths, out, baselines=baselines)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    console.print(result.table())
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if out:
        console.print(f"[bold green]wrote[/] {out}/compare.md, compare.json, compare.png", highlight=False)


RateDeviceOption = config_option(EvalConfig, "device", note="(default eval.device)")
RateDbOption = config_option(ServeConfig, "db", note="(default serve.db)")


@app.command("rate")
def rate_command(
    run_a: Annotated[str | None, typer.Argument(help="first run (A)")] = None,
    run_b: Annotated[str | None, typer.Argument(help="second run (B)")] = None,
    data: Annotated[Path | None, typer.Option(help="dataset dir whose split supplies the prompts")] = None,
    results: Annotated[bool, typer.Option("--results", help="print win/tie/loss with 95 % intervals instead of serving")] = False,
    db: RateDbOption = None,
    split: Annotated[str, typer.Option(help="split file of the dataset")] = "test",
    max_items: Annotated[int | None, typer.Option(help="rate at most this many prompts")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    device: RateDeviceOption = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (default ./chatforge.yaml)")] = None,
) -> None:
    """Blind A/B rating by people: a page on localhost shows a prompt and both runs' answers in random order."""
    from chatforge.evaluate.rating import build_rating_study, format_results, rating_results  # lazy: SQLAlchemy
    from chatforge.evaluate.rating_app import serve_rating  # lazy: FastAPI

    try:
        project = load_project(config)
        eval_cfg = merge_overrides(project.eval, {"device": device})
        db_url = db or project.serve.db
        if results:
            console.print(format_results(rating_results(db_url, run_a, run_b)), highlight=False, markup=False)
            return
        if not (run_a and run_b and data):
            fail("rate needs RUN_A RUN_B --data DATASET_DIR (or --results)")
        study = build_rating_study(run_a, run_b, data, db_url=db_url, split=split, max_items=max_items,
                                   generation=project.eval.generation, log=log_line, device=eval_cfg.device)
    except (ConfigError, LookupError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    serve_rating(db_url, study.id, host=host, port=port, log=log_line)
