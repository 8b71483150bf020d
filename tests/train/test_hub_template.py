"""Training with a hub-style tokenizer whose own chat template has no `{% generation %}` markers, and runs that a
budget ends early: answers-only loss with no extra flag, and metrics that are never empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from chatforge.config import FitConfig, PrepareConfig, TrainConfig
from chatforge.data.prepare import prepare
from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer
from chatforge.core.examples import IGNORE, tokenize_records
from chatforge.train.loop import train
from chatforge.train.monitor import read_metrics
from tests.models.hub_templates import SMOLLM2
from tests.train.chat_data import write_chat_jsonl


@pytest.fixture(scope="module")
def hub_style(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama whose tokenizer carries SmolLM2's own (marker-less) ChatML template, and a dataset for it."""
    root = tmp_path_factory.mktemp("hub-style")
    tokenizer_dir = build_tiny_tokenizer(root / "tokenizer", chat_template="chatml")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = SMOLLM2
    tokenizer.save_pretrained(tokenizer_dir)
    model_dir = build_tiny_llama(root / "model", tokenizer_dir)
    write_chat_jsonl(root / "chats.jsonl", count=60)
    prepare([root / "chats.jsonl"], root / "ds", PrepareConfig(fit=FitConfig(model=str(model_dir), max_tokens=128)))
    return model_dir, root / "ds"


def config(model_dir: Path, dataset: Path, out: Path, **changes: object) -> TrainConfig:
    settings: dict = {"data": str(dataset), "model": str(model_dir), "out": str(out), "method": "full", "lr": 3e-3,
                      "batch_size": 4, "max_steps": 4, "eval_every": 50, "save_every": 50, "log_every": 10, "threads": 1,
                      "max_length": 128}
    settings.update(changes)
    return TrainConfig(**settings)


def test_a_marker_less_hub_template_trains_answers_only_with_no_extra_flag(hub_style: tuple[Path, Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, dataset = hub_style
    messages: list[str] = []
    report = train(config(model_dir, dataset, tmp_path / "run"), log=messages.append)
    assert report.steps == 4 and report.stopped_by is None
    assert any("prefix by prefix" in m for m in messages), messages
    tokenizer = AutoTokenizer.from_pretrained(report.run_dir / "model")
    assert tokenizer.chat_template == SMOLLM2  # the run keeps the model's own template
    example = tokenize_records([{"messages": [{"role": "user", "content": "My router light is red."},
                                              {"role": "assistant", "content": "Restart the router."}]}],
                               tokenizer, "assistant", 128)[0]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == "Restart the router.<|im_end|>"
    # histogram_every defaults to about five per run, so even this 4-step run has some
    events = EventAccumulator(str(report.run_dir / "tb"), size_guidance={"histograms": 0}).Reload()
    assert any(tag.startswith("weights/") for tag in events.Tags()["histograms"])


def test_a_time_budget_stop_logs_the_last_step_and_validates_it(hub_style: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, dataset = hub_style
    messages: list[str] = []
    report = train(config(model_dir, dataset, tmp_path / "run", max_steps=40, max_minutes=1e-6), log=messages.append)
    assert report.stopped_by == "time budget" and report.steps == 1 and report.planned_steps == 40
    assert any("TIME BUDGET" in m and "step 1 of 40" in m for m in messages), messages
    metrics = read_metrics(report.run_dir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [1]  # log_every 10 > 1 step done: logged anyway
    assert [m["step"] for m in metrics if "val/loss" in m] == [1]    # eval_every 50: validated anyway
    assert report.best_val_loss is not None and (report.run_dir / "model").is_dir()


def test_lora_last_layers_adapts_only_the_top_layers(hub_style: tuple[Path, Path]) -> None:
    import torch

    from chatforge.config import LoraSettings
    from chatforge.train.model import apply_lora, load_base_model

    model_dir, _ = hub_style
    model = apply_lora(load_base_model(model_dir, torch.float32), LoraSettings(last_layers=1))
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # the tiny Llama has layers 0 and 1


def test_inspect_highlights_the_same_answer_tokens_for_a_marker_less_template(hub_style: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from chatforge.cli import app
    from chatforge.core.records import read_jsonl

    model_dir, dataset = hub_style
    result = CliRunner().invoke(app, ["inspect", str(dataset), "--model", str(model_dir), "--index", "0"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = next(iter(read_jsonl(dataset / "train.jsonl")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    example = tokenize_records([record], tokenizer, "assistant", 10**9)[0]
    assert f"{example.trained_tokens} of {len(example.input_ids)} tokens carry loss" in result.output
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == record["messages"][-1]["content"] + "<|im_end|>"
