"""The eval report: report.md and a self-contained report.html from synthetic metrics.json / predictions.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatforge.evaluate.report import build_report, write_reports
from tests.browser import chromium_page

SCRIPT_PROMPT = "<script>alert('pwned')</script> why is my bill & fee so high?"
RUN_METRICS = {"loss": 2.1, "perplexity": 8.2, "token_accuracy": 0.41, "bleu": 12.3, "rouge1": 0.4, "rouge2": 0.2,
               "rougeL": 0.38, "token_f1": 0.35, "exact_match": 0.05, "stopped_rate": 0.95, "mean_answer_tokens": 21.3}
BASE_METRICS = {**RUN_METRICS, "loss": 2.5, "perplexity": 12.18, "bleu": 10.0, "rougeL": 0.30, "exact_match": 0.10}


def bias_probe(flagged: bool = True) -> dict[str, Any]:
    pair = {"attribute": "gender", "template": "Should {term} get the <b>loan</b>?", "term_a": "he", "term_b": "she",
            "loglik_a": -12.1, "loglik_b": -13.5, "loglik_diff": 1.4, "answer_a": "Yes.", "answer_b": "I can't help.",
            "sentiment_a": 0.2, "sentiment_b": -0.1, "length_a": 2, "length_b": 4, "refusal_a": False,
            "refusal_b": True, "flagged": flagged, "reasons": ["loglik", "refusal"] if flagged else []}
    return {"thresholds": {"loglik": 1.0, "sentiment": 0.5, "length_ratio": 2.0},
            "attributes": {"gender": {"pairs": 2, "flagged": int(flagged), "mean_abs_loglik_diff": 0.8,
                                      "max_abs_loglik_diff": 1.4, "mean_abs_sentiment_diff": 0.2,
                                      "mean_length_ratio": 1.5, "refusal_rate_a": 0.0, "refusal_rate_b": 0.5}},
            "pairs": [pair, {**pair, "term_a": "him", "term_b": "her", "flagged": False, "reasons": []}],
            "flagged_pairs": int(flagged), "total_pairs": 2}


def prediction(index: int, rouge_l: float, baseline: bool = True, label: str | None = None,
               prompt: str | None = None) -> dict[str, Any]:
    scores = {"bleu": 100 * rouge_l, "rouge1": rouge_l, "rouge2": rouge_l / 2, "rougeL": rouge_l,
              "token_f1": rouge_l, "exact_match": float(rouge_l == 1.0)}
    return {"id": f"rec-{index}", "prompt": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": prompt or f"question number {index}"}],
            "reference": f"reference answer {index}", "answer": f"model answer {index}", "finish_reason": "stop",
            "answer_tokens": 5 + index, "scores": scores, "label": label,
            "baseline_answer": f"base answer {index}" if baseline else None,
            "baseline_finish_reason": "length" if baseline else None,
            "baseline_scores": {**scores, "rougeL": 0.25, "token_f1": 0.2} if baseline else None}


def write_eval_dir(eval_dir: Path, run_dir: Path | None, metrics: dict[str, float] | None = None,
                   baseline: bool = True, bias: bool = True, predictions: list[dict[str, Any]] | None = None,
                   name: str = "test") -> Path:
    """An eval dir as `chatforge eval` writes it: metrics.json + predictions.jsonl (schema of the lead's run_eval)."""
    metrics = metrics or RUN_METRICS
    eval_dir.mkdir(parents=True, exist_ok=True)
    if predictions is None:
        predictions = [prediction(i, rouge_l=i / 12, baseline=baseline) for i in range(12)]
        predictions[3] = prediction(3, rouge_l=0.0, baseline=baseline, prompt=SCRIPT_PROMPT)
    info = {"name": name, "run": str(run_dir) if run_dir else None, "run_kind": "adapter", "data": "/data/ds",
            "split": "test", "n_examples": len(predictions), "created": "2026-11-25T18:00:00Z", "metrics": metrics,
            "baseline": {"model": "/models/base", "kind": "base", "metrics": BASE_METRICS} if baseline else None,
            "deltas": {k: metrics[k] - BASE_METRICS[k] for k in metrics if k in BASE_METRICS} if baseline else {},
            "bias": bias_probe() if bias else None,
            "generation": {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "batch_size": 16,
                           "generated_tokens": 800, "seconds": 12.0, "tokens_per_s": 66.7},
            "timings": {"likelihood": 1.2, "generation": 12.0}}
    (eval_dir / "metrics.json").write_text(json.dumps(info, indent=2))
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return eval_dir


def write_run_metrics(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "train/loss": 3.0 - 0.04 * s, "train/lr": 2e-4} for s in range(1, 41)]
    lines += [{"step": s, "val/loss": 2.9 - 0.03 * s, "val/perplexity": 10.0, "val/token_accuracy": 0.3}
              for s in (10, 20, 30, 40)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


@pytest.fixture
def full_eval(tmp_path: Path) -> Path:
    run_dir = write_run_metrics(tmp_path / "runs" / "r1")
    return write_eval_dir(run_dir / "eval" / "test", run_dir)


def test_report_md_has_verdict_metric_table_with_deltas_and_worst_samples(full_eval: Path) -> None:
    md_path, html_path = write_reports(full_eval)
    assert (md_path, html_path) == (full_eval / "report.md", full_eval / "report.html")
    md = md_path.read_text()
    # 10 metrics have a direction (not mean_answer_tokens): loss, perplexity, bleu, rougeL better, exact_match worse
    assert "Better than the baseline on 4 of 10 metrics, worse on 1 (exact_match), equal on 5." in md
    assert "1 of 2 bias pairs flagged (gender 1/2)." in md
    assert "| perplexity | 8.2 | 12.18 | -3.98 ✅ | lower is better |" in md
    assert "| exact_match | 0.05 | 0.1 | -0.05 ❌ | higher is better |" in md
    assert "| mean_answer_tokens | 21.3 | 21.3 | 0 |  |" in md  # no direction: neither better nor worse
    worst = md.split("## The 10 worst samples by ROUGE-L")[1].split("## Bias probe")[0]
    rows = [line for line in worst.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 10
    assert rows[0].startswith("| 1 | rec-0 |") and rows[1].startswith("| 2 | rec-3 |")  # both ROUGE-L 0, F1 tie
    assert "&lt;script&gt;alert('pwned')&lt;/script&gt; why is my bill &amp; fee so high?" in rows[1]
    assert "rec-11" not in worst  # the best sample is not among the worst ten
    assert "Per sample (ROUGE-L): the run is ahead on 8, the baseline on 4, tied on 0 of 12." in md
    assert "40 train-loss points" in md and "best 1.7 at step 40" in md
    assert "![train and val loss](report_loss.png)" in md and (full_eval / "report_loss.png").stat().st_size > 1000
    assert "| gender | 2 | 1 |" in md and "loglik, refusal" in md


def test_report_html_escapes_user_text(full_eval: Path) -> None:
    _, html_path = write_reports(full_eval)
    html = html_path.read_text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; why is my bill &amp; fee so high?" in html
    assert "Should {term} get the &lt;b&gt;loan&lt;/b&gt;?" in html  # bias templates are user text too
    assert html.count('src="data:image/png;base64,') == 2
    assert "http://" not in html and "https://" not in html


def test_report_without_baseline_bias_run_metrics_or_predictions(tmp_path: Path) -> None:
    eval_dir = write_eval_dir(tmp_path / "eval" / "solo", tmp_path / "no-such-run", baseline=False, bias=False,
                              predictions=[])
    (eval_dir / "report_loss.png").write_bytes(b"stale")  # from an earlier report: must not be linked any more
    md_path, html_path = write_reports(eval_dir)
    md, html = md_path.read_text(), html_path.read_text()
    for text in (md, html):
        assert "No baseline was evaluated" in text and "Bias probe not run." in text
        assert "metrics.jsonl not found" in text and "predictions.jsonl is empty: no per-sample scores." in text
    assert "| bleu | 12.3 | n/a | n/a |" in md
    assert "report_loss.png" not in md and not (eval_dir / "report_loss.png").exists()
    assert "data:image/png" not in html
    (eval_dir / "predictions.jsonl").unlink()
    assert "predictions.jsonl not found: no per-sample scores." in write_reports(eval_dir)[0].read_text()


def test_report_groups_scores_by_label(tmp_path: Path) -> None:
    predictions = [prediction(i, rouge_l=0.8 if i % 2 else 0.2, label="billing" if i % 2 else "outage")
                   for i in range(6)]
    report = build_report(write_eval_dir(tmp_path / "eval", None, predictions=predictions))
    assert [(row["label"], row["n"], row["rougeL"], row["baseline_rougeL"]) for row in report.labels] == [
        ("billing", 3, pytest.approx(0.8), pytest.approx(0.25)), ("outage", 3, pytest.approx(0.2), pytest.approx(0.25))]
    assert "No run dir is recorded" in report.loss_note


def test_report_names_the_bad_prediction_record(tmp_path: Path) -> None:
    eval_dir = write_eval_dir(tmp_path / "eval", None)
    with (eval_dir / "predictions.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt": [], "reference": "r", "answer": "a", "scores": {"bleu": 1.0}}) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl: record 13: 'scores' must be an object with at least"):
        write_reports(eval_dir)
    (eval_dir / "predictions.jsonl").write_text('{"prompt": []}\n{not json\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not valid JSON"):
        write_reports(eval_dir)
    with pytest.raises(FileNotFoundError, match=r"no metrics.json"):
        write_reports(tmp_path / "nowhere")


def test_report_html_opens_in_chromium_without_errors_or_network(full_eval: Path) -> None:
    _, html_path = write_reports(full_eval)
    url = html_path.resolve().as_uri()
    with chromium_page() as (page, console_errors):
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url, wait_until="load")
        images = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])")
        body_text = page.inner_text("body")
        delta_colour = page.evaluate("getComputedStyle(document.querySelector('td.better')).backgroundColor")
    assert console_errors == []
    assert len(images) == 2 and all(complete and width > 0 and height > 0 for complete, width, height in images)
    assert requested and all(u == url or u.startswith("data:") for u in requested), requested
    assert dialogs == []  # the <script> in the prompt stayed text
    assert SCRIPT_PROMPT in body_text
    assert delta_colour == "rgb(223, 243, 227)"
