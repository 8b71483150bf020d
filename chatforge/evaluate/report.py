"""The eval report: RUN/eval/NAME/report.md and a self-contained report.html, from the files `chatforge eval` wrote.

Use it like this (as `chatforge.evaluate.run_eval` does once metrics.json and predictions.jsonl are written)::

    md_path, html_path = write_reports(RunDir(run_dir).eval_dir("test"))              # run dir taken from metrics.json
    write_reports(eval_dir, run_dir=Path("runs/r1"))                          # or named, for the loss curves

It answers "is the fine-tuned model better than the baseline, where, and is it safe to ship?": a verdict, the
metric table (run / baseline / delta, coloured by direction: lower is better for loss and perplexity), the run's
loss curves (RUN/metrics.jsonl), per-sample ROUGE-L and token-F1 histograms (run vs baseline), per-label scores,
the ten worst samples by ROUGE-L and the bias probe's tables. report.html inlines its CSS and its plots (base64 PNG
data URLs): no scripts, no network, and a Content Security Policy tells the browser so. The plots are also written
beside it (report_loss.png, report_scores.png) for report.md. User text is escaped (jinja autoescape; in Markdown
`<`, `>`, `&`, `|`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from chatforge.core.records import read_jsonl
from chatforge.core.rundir import RunDir
from chatforge.evaluate.plots import data_uri, loss_curves_png, scores_png

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
NO_DIRECTION = frozenset({"mean_answer_tokens"})  # longer answers are not better or worse in themselves
METRIC_ORDER = ("loss", "perplexity", "token_accuracy", "bleu", "rouge1", "rouge2", "rougeL", "token_f1",
                "exact_match", "accuracy", "macro_f1", "stopped_rate", "mean_answer_tokens")
HISTOGRAM_SCORES = ("rougeL", "token_f1")
WORST_SAMPLES = 10
MAX_FLAGGED_PAIRS_SHOWN = 50
LOSS_PNG, SCORES_PNG = "report_loss.png", "report_scores.png"


def metric_direction(name: str) -> int:
    """-1 when lower is better (loss, perplexity), 0 when neither (answer length), +1 otherwise."""
    return -1 if name in LOWER_IS_BETTER else 0 if name in NO_DIRECTION else 1


def order_metrics(names: set[str] | list[str]) -> list[str]:
    """Known metrics in the report's order, then any others alphabetically."""
    return [n for n in METRIC_ORDER if n in names] + sorted(set(names) - set(METRIC_ORDER))


def format_value(value: Any, signed: bool = False) -> str:
    """A metric value for a table: 4 significant digits (1 decimal from 1000 on), 'n/a' for missing."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and abs(value) >= 1000):
        text = str(value) if isinstance(value, int) else f"{value:.1f}"
    else:
        text = f"{value:.4g}"
    return "+" + text if signed and value > 0 else text


def outcome(name: str, delta: float | None) -> str:
    """'better', 'worse' or 'same' for the run against the baseline; '' without a delta or a direction."""
    if delta is None or not math.isfinite(delta) or metric_direction(name) == 0:
        return ""
    if abs(delta) < 1e-12:
        return "same"
    return "better" if delta * metric_direction(name) > 0 else "worse"


@dataclass
class MetricRow:
    name: str
    run: float | None
    baseline: float | None
    delta: float | None
    outcome: str  # better / worse / same / "" (nothing to compare or no direction)
    direction: str  # "lower is better", "higher is better" or ""


@dataclass
class Report:
    """Everything report.md and report.html show; both render this one object."""
    info: dict[str, Any]
    header: list[tuple[str, str]]
    verdict: list[str]
    bias_alert: bool
    rows: list[MetricRow]
    sample_comparison: str | None
    loss_note: str
    loss_png: bytes | None
    scores_png: bytes | None
    score_means: list[tuple[str, float, float | None]]
    labels: list[dict[str, Any]]
    worst: list[dict[str, Any]]
    predictions_note: str
    bias: dict[str, Any] | None
    flagged_pairs: list[dict[str, Any]]
    flagged_not_shown: int


def load_eval(eval_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """metrics.json and predictions.jsonl of an eval dir (predictions None when the file is absent), checked."""
    metrics_path = eval_dir / RunDir.EVAL_METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{eval_dir}: no metrics.json; run `chatforge eval` to write this eval dir")
    try:
        info = json.loads(metrics_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{metrics_path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(info, dict) or not isinstance(info.get("metrics"), dict):
        raise ValueError(f"{metrics_path}: expected an object with a 'metrics' object (see chatforge eval's schema)")
    predictions_path = eval_dir / "predictions.jsonl"
    if not predictions_path.is_file():
        return info, None
    predictions = list(read_jsonl(predictions_path))
    for line_number, record in enumerate(predictions, start=1):
        where = f"{predictions_path}: record {line_number}"
        if missing := [key for key in ("prompt", "reference", "answer") if key not in record]:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(record.get("scores"), dict) or "rougeL" not in record["scores"]:
            raise ValueError(f"{where}: 'scores' must be an object with at least 'rougeL'")
        if not isinstance(record["prompt"], list):
            raise ValueError(f"{where}: 'prompt' must be a list of chat messages")
    return info, predictions


def read_training_curves(run_dir: Path | None) -> tuple[list[tuple[float, float]], list[tuple[float, float]], str]:
    """(train points, val points, note) from RUN/metrics.jsonl; the note says what was found or why nothing was."""
    if run_dir is None:
        return [], [], "No run dir is recorded in metrics.json, so there are no training curves."
    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return [], [], f"No training curves: {path} not found (ensembles and base models have none)."
    train, val = [], []
    for line_number, record in enumerate(read_jsonl(path), start=1):
        if ("train/loss" in record or "val/loss" in record) and not isinstance(record.get("step"), (int, float)):
            raise ValueError(f"{path}: record {line_number}: a loss without a numeric 'step'")
        if "train/loss" in record:
            train.append((record["step"], float(record["train/loss"])))
        if "val/loss" in record:
            val.append((record["step"], float(record["val/loss"])))
    if not train and not val:
        return [], [], f"No training curves: {path} has no train/loss or val/loss entries."
    parts = [f"Read from {path}:"]
    if train:
        parts.append(f"{len(train)} train-loss point{'s' * (len(train) != 1)}, last {train[-1][1]:.4g} at step {train[-1][0]:g};")
    if val:
        best_step, best_loss = min(val, key=lambda point: point[1])
        parts.append(f"{len(val)} val-loss point{'s' * (len(val) != 1)}, best {best_loss:.4g} at step {best_step:g}, "
                     f"last {val[-1][1]:.4g} at step {val[-1][0]:g}.")
    return train, val, " ".join(parts)


def metric_rows(info: dict[str, Any]) -> list[MetricRow]:
    """Run, baseline and delta (run minus baseline) per metric; a delta missing from metrics.json is computed."""
    run_metrics = info["metrics"]
    baseline_metrics = (info.get("baseline") or {}).get("metrics") or {}
    deltas = info.get("deltas") or {}
    rows = []
    for name in order_metrics(set(run_metrics) | set(baseline_metrics)):
        run_value, baseline_value = run_metrics.get(name), baseline_metrics.get(name)
        delta = deltas.get(name)
        if delta is None and isinstance(run_value, (int, float)) and isinstance(baseline_value, (int, float)):
            delta = run_value - baseline_value
        direction = {-1: "lower is better", 0: "", 1: "higher is better"}[metric_direction(name)]
        rows.append(MetricRow(name, run_value, baseline_value, delta, outcome(name, delta), direction))
    return rows


def verdict_lines(info: dict[str, Any], rows: list[MetricRow]) -> list[str]:
    """The report's first lines: better/worse than the baseline on how many metrics, and the bias probe's count."""
    lines = []
    baseline = info.get("baseline")
    compared = [row for row in rows if row.outcome]
    if not baseline:
        lines.append("No baseline was evaluated, so there is nothing to compare with.")
    elif not compared:
        lines.append("The baseline shares no metric with the run.")
    else:
        better, worse = ([row.name for row in compared if row.outcome == kind] for kind in ("better", "worse"))
        worse_names = f" ({', '.join(worse)})" if worse else ""
        lines.append(f"Better than the baseline on {len(better)} of {len(compared)} metrics, worse on {len(worse)}"
                     f"{worse_names}, equal on {len(compared) - len(better) - len(worse)}.")
    bias = info.get("bias")
    if not bias:
        lines.append("Bias probe not run.")
    else:
        flagged, total = bias.get("flagged_pairs", 0), bias.get("total_pairs", 0)
        by_attribute = [f"{name} {stats.get('flagged', 0)}/{stats.get('pairs', 0)}"
                        for name, stats in (bias.get("attributes") or {}).items() if stats.get("flagged")]
        detail = f" ({', '.join(by_attribute)})" if by_attribute else ""
        lines.append(f"{flagged} of {total} bias pairs flagged{detail}.")
    return lines


def header_items(info: dict[str, Any]) -> list[tuple[str, str]]:
    """What was evaluated, against what, and how it was generated."""
    baseline = info.get("baseline")
    generation = info.get("generation") or {}
    timings = info.get("timings") or {}
    skipped = info.get("skipped_no_assistant_turn")
    return [
        ("run", f"{info.get('run', 'n/a')} ({info.get('run_kind', 'unknown kind')})"),
        ("data", f"{info.get('data', 'n/a')}, split {info.get('split', 'n/a')}"),
        ("examples", format_value(info.get("n_examples")) + (f" ({skipped} skipped: no assistant turn)" if skipped else "")),
        ("baseline", f"{baseline.get('model', 'n/a')} ({baseline.get('kind', 'unknown kind')})" if baseline else "none"),
        ("generation", ", ".join(f"{key} {format_value(value)}" for key, value in generation.items()) or "n/a"),
        ("timings (s)", ", ".join(f"{key} {format_value(value)}" for key, value in timings.items()) or "n/a"),
        ("created", str(info.get("created", "n/a"))),
    ]


def sample_comparison(predictions: list[dict[str, Any]]) -> str | None:
    """How many samples the run scores higher / lower / equal ROUGE-L than the baseline on."""
    pairs = [(p["scores"]["rougeL"], p["baseline_scores"]["rougeL"]) for p in predictions
             if isinstance(p.get("baseline_scores"), dict) and "rougeL" in p["baseline_scores"]]
    if not pairs:
        return None
    ahead = sum(run > base for run, base in pairs)
    behind = sum(run < base for run, base in pairs)
    return (f"Per sample (ROUGE-L): the run is ahead on {ahead}, the baseline on {behind}, "
            f"tied on {len(pairs) - ahead - behind} of {len(pairs)}.")


def sample_values(predictions: list[dict[str, Any]], score: str, side: str = "scores") -> list[float]:
    """One per-sample score of every prediction that has it; side "scores" (the run) or "baseline_scores"."""
    return [p[side][score] for p in predictions if isinstance(p.get(side), dict) and score in p[side]]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def label_rows(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ROUGE-L and token F1 per label (run and baseline), when the data has labels."""
    if not any(p.get("label") is not None for p in predictions):
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for prediction in predictions:
        label = prediction.get("label")
        groups.setdefault("(no label)" if label is None else str(label), []).append(prediction)
    return [{"label": label, "n": len(members), **{score: mean(sample_values(members, score)) for score in HISTOGRAM_SCORES},
             **{f"baseline_{s}": mean(sample_values(members, s, "baseline_scores")) for s in HISTOGRAM_SCORES}}
            for label, members in sorted(groups.items())]


def worst_samples(predictions: list[dict[str, Any]], count: int = WORST_SAMPLES) -> list[dict[str, Any]]:
    """The `count` predictions with the lowest ROUGE-L (ties: lower token F1 first, then file order)."""
    ranked = sorted(enumerate(predictions),
                    key=lambda item: (item[1]["scores"]["rougeL"], item[1]["scores"].get("token_f1", 0.0), item[0]))
    return [{**prediction, "rank": rank, "line": index + 1}
            for rank, (index, prediction) in enumerate(ranked[:count], start=1)]


def score_histograms(predictions: list[dict[str, Any]]) -> tuple[bytes | None, list[tuple[str, float, float | None]]]:
    """The run-vs-baseline histogram PNG of HISTOGRAM_SCORES, and each score's mean (run, baseline or None)."""
    run_scores = {score: values for score in HISTOGRAM_SCORES if (values := sample_values(predictions, score))}
    if not run_scores:
        return None, []
    baseline_scores = {score: sample_values(predictions, score, "baseline_scores") for score in run_scores}
    means = [(score, mean(values), mean(baseline_scores[score])) for score, values in run_scores.items()]
    return scores_png(run_scores, baseline_scores if any(baseline_scores.values()) else None), means


def build_report(eval_dir: Path, run_dir: Path | None = None) -> Report:
    """Read the eval dir (and the run's metrics.jsonl) into the one object both report files render."""
    info, predictions = load_eval(eval_dir)
    if run_dir is None and info.get("run"):
        run_dir = Path(info["run"])
    rows = metric_rows(info)
    train, val, loss_note = read_training_curves(run_dir)
    predictions_note = "" if predictions else (
        f"{eval_dir / 'predictions.jsonl'} {'is empty' if predictions == [] else 'not found'}: no per-sample scores.")
    predictions = predictions or []
    histogram_png, score_means = score_histograms(predictions)
    bias = info.get("bias") or None
    flagged = [pair for pair in (bias or {}).get("pairs", []) if pair.get("flagged")]
    return Report(
        info=info, header=header_items(info), verdict=verdict_lines(info, rows),
        bias_alert=bool(bias and bias.get("flagged_pairs")), rows=rows,
        sample_comparison=sample_comparison(predictions), loss_note=loss_note,
        loss_png=loss_curves_png(train, val) if train or val else None, scores_png=histogram_png,
        score_means=score_means, labels=label_rows(predictions), worst=worst_samples(predictions),
        predictions_note=predictions_note, bias=bias, flagged_pairs=flagged[:MAX_FLAGGED_PAIRS_SHOWN],
        flagged_not_shown=max(0, len(flagged) - MAX_FLAGGED_PAIRS_SHOWN))


def render_html(report: Report) -> str:
    """report.html: the jinja template with autoescape on, so every user string is escaped."""
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["metric"] = format_value
    environment.filters["data_uri"] = data_uri
    return environment.get_template("report.html.j2").render(report=report)


def md_text(value: Any, width: int | None = None) -> str:
    """User text for a Markdown table cell: one line, shortened, with HTML specials and pipes escaped."""
    text = " ".join(str(value).split()) if value is not None else ""
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def last_user_turn(prompt: list[dict[str, Any]]) -> str:
    users = [message.get("content", "") for message in prompt if message.get("role") == "user"]
    return users[-1] if users else (prompt[-1].get("content", "") if prompt else "")


def render_markdown(report: Report) -> str:
    """report.md: the HTML report's content as Markdown tables, linking the plot PNGs written beside it."""
    lines = [f"# Eval report: {md_text(report.info.get('name', 'eval'))}", "",
             *(f"**{md_text(line)}**  " for line in report.verdict)]
    if report.sample_comparison:
        lines.append(report.sample_comparison)
    lines += ["", *(f"- **{key}**: {md_text(value)}" for key, value in report.header), "", "## Metrics", ""]
    marks = {"better": " ✅", "worse": " ❌", "same": "", "": ""}
    lines += md_table(["metric", "run", "baseline", "delta", "direction"], [
        [row.name, format_value(row.run), format_value(row.baseline),
         format_value(row.delta, signed=True) + marks[row.outcome], row.direction] for row in report.rows])
    lines += ["", "## Training loss", "", md_text(report.loss_note)]
    if report.loss_png:
        lines += ["", f"![train and val loss]({LOSS_PNG})"]
    lines += ["", "## Per-sample scores", ""]
    if report.predictions_note:
        lines.append(md_text(report.predictions_note))
    if report.scores_png:
        lines += md_table(["score", "run mean", "baseline mean"],
                          [[name, format_value(run), format_value(base)] for name, run, base in report.score_means])
        lines += ["", f"![per-sample score histograms]({SCORES_PNG})"]
    if report.labels:
        lines += ["", "### By label", ""]
        lines += md_table(["label", "n", "ROUGE-L run", "ROUGE-L baseline", "token F1 run", "token F1 baseline"], [
            [md_text(r["label"]), str(r["n"]), *(format_value(r[k]) for k in
                                                   ("rougeL", "baseline_rougeL", "token_f1", "baseline_token_f1"))]
            for r in report.labels])
    if report.worst:
        lines += ["", f"## The {len(report.worst)} worst samples by ROUGE-L", ""]
        lines += md_table(["#", "id", "prompt (last user turn)", "reference", "answer", "baseline answer", "scores"], [
            [str(s["rank"]), md_text(s.get("id", f"line {s['line']}")), md_text(last_user_turn(s["prompt"]), 200),
             md_text(s["reference"], 200), md_text(s["answer"], 200) + f" ({md_text(s.get('finish_reason'))})",
             md_text(s.get("baseline_answer"), 200) if s.get("baseline_answer") is not None else "n/a",
             ", ".join(f"{k} {format_value(v)}" + (f" (baseline {format_value(s['baseline_scores'].get(k))})"
                                                   if s.get("baseline_scores") else "")
                       for k, v in s["scores"].items())] for s in report.worst])
    lines += ["", "## Bias probe", ""]
    if not report.bias:
        return "\n".join([*lines, "Bias probe not run.", ""])
    thresholds = report.bias.get("thresholds") or {}
    lines += ["Thresholds: " + (", ".join(f"{k} {format_value(v)}" for k, v in thresholds.items()) or "n/a"), ""]
    columns = ("pairs", "flagged", "mean_abs_loglik_diff", "max_abs_loglik_diff", "mean_abs_sentiment_diff",
               "mean_length_ratio", "refusal_rate_a", "refusal_rate_b")
    lines += md_table(["attribute", *columns], [[md_text(name), *(format_value(stats.get(c)) for c in columns)]
                                                  for name, stats in (report.bias.get("attributes") or {}).items()])
    if report.flagged_pairs:
        lines += ["", "### Flagged pairs", ""]
        lines += md_table(["attribute", "template", "a / b", "loglik diff", "answer a", "answer b", "reasons"], [
            [md_text(p.get("attribute")), md_text(p.get("template"), 120),
             md_text(f"{p.get('term_a')} / {p.get('term_b')}"), format_value(p.get("loglik_diff")),
             md_text(p.get("answer_a"), 150), md_text(p.get("answer_b"), 150), md_text(", ".join(p.get("reasons", [])))]
            for p in report.flagged_pairs])
    if report.flagged_not_shown:
        lines += ["", f"{report.flagged_not_shown} more flagged pairs are in metrics.json (bias.pairs)."]
    return "\n".join(lines) + "\n"


def write_reports(eval_dir: Path, run_dir: Path | None = None) -> tuple[Path, Path]:
    """Write eval_dir/report.md and eval_dir/report.html (+ the plot PNGs report.md links); returns (md, html)."""
    report = build_report(eval_dir, run_dir)
    for name, png in ((LOSS_PNG, report.loss_png), (SCORES_PNG, report.scores_png)):
        if png is not None:
            (eval_dir / name).write_bytes(png)
        else:
            (eval_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report must not be linked
    md_path, html_path = eval_dir / "report.md", eval_dir / "report.html"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return md_path, html_path
