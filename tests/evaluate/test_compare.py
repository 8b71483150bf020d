"""`compare`: several evals (and their shared baseline) in one table, compare.md/.json/.png; clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from chatforge.evaluate.compare import compare
from tests.evaluate.test_report import BASE_METRICS, RUN_METRICS, write_eval_dir


def test_compare_two_runs_and_their_shared_baseline(tmp_path: Path) -> None:
    first = write_eval_dir(tmp_path / "runs" / "r1" / "eval" / "test", tmp_path / "runs" / "r1")
    better = {**RUN_METRICS, "perplexity": 6.0, "bleu": 20.0, "accuracy": 0.9}  # only r2 has labels
    write_eval_dir(tmp_path / "runs" / "r2" / "eval" / "old", tmp_path / "runs" / "r2", metrics=RUN_METRICS)
    newest = write_eval_dir(tmp_path / "runs" / "r2" / "eval" / "test", tmp_path / "runs" / "r2", metrics=better)
    os.utime(newest / "metrics.json", (2e9, 2e9))  # the run dir resolves to its newest eval
    result = compare([first, tmp_path / "runs" / "r2"], out=tmp_path / "cmp")

    assert [(row.name, row.path) for row in result.rows] == [
        ("r1/test", first), ("r2/test", newest), ("baseline: base", first)]  # one baseline row for both evals
    assert result.rows[1].metrics["bleu"] == 20.0 and result.rows[2].metrics == BASE_METRICS
    assert "accuracy" in result.metric_names and "accuracy" not in result.shared_metrics
    assert result.best_rows("perplexity") == {1} and result.best_rows("bleu") == {1}
    assert result.best_rows("loss") == {0, 1}  # a tie: both runs beat the baseline's 2.5
    assert result.best_rows("rouge1") == set() and result.best_rows("mean_answer_tokens") == set()
    assert result.warnings == []

    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| metric | r1/test | r2/test | baseline: base |" in md
    assert "| perplexity | 8.2 | **6** | 12.18 |" in md and "| loss | **2.1** | **2.1** | 2.5 |" in md
    assert "| rouge1 | 0.4 | 0.4 | 0.4 |" in md and "| accuracy | n/a | 0.9 | n/a |" in md
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["r1/test", "r2/test", "baseline: base"]
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    console = Console(record=True, width=120)
    console.print(result.table())
    printed = console.export_text()
    assert "r2/test" in printed and "12.18" in printed


def test_compare_warns_when_rows_used_different_data(tmp_path: Path) -> None:
    first = write_eval_dir(tmp_path / "a" / "eval" / "test", None, baseline=False)
    second = write_eval_dir(tmp_path / "b" / "eval" / "val", None, baseline=False, predictions=[])
    result = compare([first, second])
    assert [row.name for row in result.rows] == ["a/test", "b/val"]
    assert len(result.warnings) == 1 and "(12 examples)" in result.warnings[0] and "(0 examples)" in result.warnings[0]
    assert "> the rows were scored on different data" in result.to_markdown()


def test_compare_errors_name_the_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "fresh"
    (run_dir / "eval").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"fresh: neither an eval dir .* run `chatforge eval .*fresh` first"):
        compare([run_dir])
    with pytest.raises(FileNotFoundError, match=r"missing: no such run or eval dir"):
        compare([tmp_path / "missing"])
    eval_dir = write_eval_dir(run_dir / "eval" / "test", run_dir)
    with pytest.raises(ValueError, match=r"the same eval as"):
        compare([run_dir, eval_dir])
