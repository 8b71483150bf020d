"""The model card: training writes RUN/model/README.md with Hugging Face front matter, eval adds its metrics and
the bias probe, and `export --hf` carries the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.config import BiasConfig, EvalConfig, GenerationConfig
from chatforge.evaluate.run_eval import evaluate_run
from chatforge.models.export import export_hf
from chatforge.models.model_card import read_front_matter
from tests.models.test_run import prepared_dataset, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("card")
    return tiny_run(prepared_dataset(root, tiny_model_dir), tiny_model_dir, root / "run", "lora")


def card_of(path: Path) -> tuple[dict, str]:
    text = (path / "README.md").read_text(encoding="utf-8")
    return read_front_matter(text), text


def test_training_writes_a_card_with_front_matter_data_and_settings(run_dir: Path, tiny_model_dir: Path) -> None:
    front, text = card_of(run_dir / "model")
    assert front["base_model"] == tiny_model_dir.name and front["license"] == "other"
    assert front["library_name"] == "peft" and {"chatforge", "lora"} <= set(front["tags"])
    assert front["datasets"] == ["ds"] and "model-index" not in front
    data_card = json.loads((run_dir.parent / "ds" / "card.json").read_text())
    assert f"| train | {data_card['counts']['train']} |" in text and "chats.jsonl" in text
    assert "PII handling" in text and "| method | lora |" in text and "r=16" in text
    for heading in ("## Intended use", "## Training data", "## Training procedure", "## Evaluation",
                    "## Bias probe", "## Bias, risks, limitations and ethical considerations"):
        assert heading in text
    assert "Not evaluated yet" in text


def test_eval_adds_metrics_against_the_base_and_bias_findings(run_dir: Path) -> None:
    cfg = EvalConfig(max_examples=4, name="card", generation=GenerationConfig(max_new_tokens=4, batch_size=4),
                     bias=BiasConfig(attributes=["gender"], max_new_tokens=4))
    report = evaluate_run(run_dir, cfg, log=lambda _m: None)
    front, text = card_of(run_dir / "model")
    results = front["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "test"
    written = {m["type"]: m["value"] for m in results["metrics"]}
    expected = report.metrics["metrics"]
    assert written["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert written["rougeL"] == pytest.approx(expected["rougeL"], rel=1e-5, abs=1e-6)
    base_ppl = report.metrics["baseline"]["metrics"]["perplexity"]
    assert f"base model: {base_ppl:.4g}" in [m["name"] for m in results["metrics"] if m["type"] == "perplexity"][0]
    bias = report.metrics["bias"]
    assert f"**{bias['flagged_pairs']} of {bias['total_pairs']}** pairs" in text and "| gender |" in text
    assert "Not evaluated yet" not in text


def test_export_hf_carries_the_card(run_dir: Path, tmp_path: Path) -> None:
    out = export_hf(run_dir, tmp_path / "hf")
    assert (out / "README.md").read_text() == (run_dir / "model" / "README.md").read_text()
    assert read_front_matter((out / "README.md").read_text())["base_model"]


def test_front_matter_is_required() -> None:
    with pytest.raises(ValueError, match="no YAML front matter"):
        read_front_matter("# a card without metadata\n")
