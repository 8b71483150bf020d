"""`chatforge eval` on a tiny LoRA run: the numbers in metrics.json are what sacrebleu / rouge-score / a plain
forward pass give from scratch, the baseline is the run's base with deltas, and every output file is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatforge.config import BiasConfig, EvalConfig, GenerationConfig
from chatforge.evaluate.labels import label_metrics
from chatforge.evaluate.run_eval import EvalError, evaluate_run
from tests.models.test_run import prepared_dataset, tiny_run

FAST = EvalConfig(max_examples=10, generation=GenerationConfig(max_new_tokens=12, batch_size=4),
                  bias=BiasConfig(enabled=False))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval")
    run_dir = tiny_run(prepared_dataset(root, tiny_model_dir), tiny_model_dir, root / "run", "lora", lr=1e-2, max_steps=6)
    report = evaluate_run(run_dir, FAST, log=lambda _m: None)
    return report.eval_dir, report.metrics


def predictions(eval_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]


def test_bleu_and_rouge_recomputed_from_predictions_equal_metrics_json(evaluated: tuple[Path, dict]) -> None:
    eval_dir, _ = evaluated
    written = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    rows = predictions(eval_dir)
    answers, references = [r["answer"] for r in rows], [r["reference"] for r in rows]
    assert written["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        mean = sum(scorer.score(ref, ans)[name].fmeasure for ans, ref in zip(answers, references)) / len(rows)
        assert written[name] == pytest.approx(mean, abs=1e-9)
        for row in rows:
            assert row["scores"][name] == pytest.approx(scorer.score(row["reference"], row["answer"])[name].fmeasure)


def test_perplexity_is_exp_of_mean_masked_loss_computed_independently(evaluated: tuple[Path, dict]) -> None:
    eval_dir, metrics = evaluated
    run_model = Path(metrics["run"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(run_model)
    base_dir = json.loads((run_model / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run_model).eval()
    total_loss, total_tokens = 0.0, 0
    for row in predictions(eval_dir):
        messages = row["prompt"] + [{"role": "assistant", "content": row["reference"]}]
        encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor([encoded["input_ids"]])
        mask = torch.tensor(encoded["assistant_masks"][1:], dtype=torch.bool)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total_loss += float(losses[mask].sum())
        total_tokens += int(mask.sum())
    assert metrics["metrics"]["loss"] == pytest.approx(total_loss / total_tokens, rel=1e-4)
    assert metrics["metrics"]["perplexity"] == pytest.approx(math.exp(total_loss / total_tokens), rel=1e-4)


def test_baseline_is_the_base_model_with_deltas_and_answers(evaluated: tuple[Path, dict], tiny_model_dir: Path) -> None:
    eval_dir, metrics = evaluated
    assert Path(metrics["baseline"]["model"]).resolve() == tiny_model_dir.resolve()
    assert metrics["baseline"]["kind"] == "base"
    for key, delta in metrics["deltas"].items():
        assert delta == pytest.approx(metrics["metrics"][key] - metrics["baseline"]["metrics"][key])
    assert {"bleu", "rougeL", "perplexity", "stopped_rate"} <= metrics["deltas"].keys()
    rows = predictions(eval_dir)
    test_split = (Path(metrics["data"]) / "test.jsonl").read_text().splitlines()
    assert len(rows) == metrics["n_examples"] == min(10, len(test_split)) > 0
    assert all(r["baseline_answer"] is not None and r["baseline_scores"] for r in rows)
    # a LoRA run at lr 1e-2 has moved away from its random base: the two losses differ
    assert metrics["metrics"]["loss"] != pytest.approx(metrics["baseline"]["metrics"]["loss"])


def test_eval_writes_report_and_manifest(evaluated: tuple[Path, dict]) -> None:
    eval_dir, metrics = evaluated
    for name in ("metrics.json", "predictions.jsonl", "report.md", "report.html", "manifest.json"):
        assert (eval_dir / name).is_file(), name
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and manifest["counts"]["evaluated"] == metrics["n_examples"]
    assert any(i["path"].endswith("test.jsonl") and len(i["sha256"]) == 64 for i in manifest["inputs"])
    assert metrics["generation"]["generated_tokens"] > 0


def test_eval_refuses_what_is_not_a_run_or_has_no_split(tmp_path: Path, evaluated: tuple[Path, dict]) -> None:
    with pytest.raises(EvalError, match="not a chatforge run"):
        evaluate_run(tmp_path, FAST, log=lambda _m: None)
    run_dir = Path(evaluated[1]["run"])
    with pytest.raises(EvalError, match="nosuch.jsonl: missing"):
        evaluate_run(run_dir, FAST.model_copy(update={"split": "nosuch"}), log=lambda _m: None)


def test_label_metrics_only_for_classification_like_sets() -> None:
    labels = ["billing", "outage", "billing", "outage"]
    references = ["Your invoice is attached.", "The network is down.", "Your invoice is attached.", "The network is down."]
    answers = ["Your invoice is attached.", "billing question", "The network is down today", "outage in your area"]
    scores = label_metrics(labels, answers, references, max_classes=20)
    assert scores["accuracy"] == pytest.approx(0.5)  # answers 1 and 4 right (by wording and by name), 2 and 3 wrong
    assert label_metrics([None, "x"], answers[:2], references[:2], 20) == {}
    assert label_metrics(["a", "a"], answers[:2], references[:2], 20) == {}  # one class is not a classification
