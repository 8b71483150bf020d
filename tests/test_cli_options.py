"""CLI options come from the config fields: every flag of today is still there and in --help, and every config field
a flag sets has a description (it is the flag's help), so adding an option means adding a documented field."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

import chatforge.cli.options
from chatforge.cli import app
from chatforge.cli.options import EXPOSED_FIELDS, ConfigOptions, config_field, field_option
from chatforge.config import EvalConfig, TrainConfig

runner = CliRunner()

# The flags of every command as they were before the options came from the config fields (read off the typer app
# of commit 829b68c); a flag may be added, never lost or renamed.
TODAY_FLAGS: dict[str, list[str]] = {
    "init": ["--out", "-o", "--force", "--no-force"],
    "prepare": ["--out", "-o", "--config", "-c", "--format", "--strict", "--no-strict", "--trailing-user", "--split",
                "--seed", "--model", "--chat-template", "--max-tokens", "--overflow", "--clean", "--no-clean", "--pii",
                "--no-pii", "--dedup", "--no-dedup", "--dedup-threshold", "--fit", "--no-fit", "--balance",
                "--no-balance", "--augment", "--no-augment", "--workers"],
    "train": ["--config", "-c", "--data", "--model", "--chat-template", "--out", "-o", "--method", "--train-on",
              "--packing", "--no-packing", "--max-length", "--lr", "--optimizer", "--schedule", "--batch-size",
              "--grad-accum", "--epochs", "--max-steps", "--eval-every", "--save-every", "--histogram-every",
              "--max-minutes", "--seed", "--lora-r", "--merge", "--no-merge", "--device", "--resume", "--dry-run"],
    "inspect": ["--model", "--chat-template", "--train-on", "--index", "--split"],
    "ensemble": ["--out", "-o", "--weights", "--soup", "--device"],
    "sweep": ["--out", "-o", "--config", "-c", "--storage", "--resume"],
    "eval": ["--data", "--baseline", "--name", "--split", "--max-examples", "--max-new-tokens", "--temperature",
             "--top-p", "--batch-size", "--bias", "--no-bias", "--device", "--config", "-c"],
    "compare": ["--out", "--baselines", "--no-baselines"],
    "rate": ["--data", "--results", "--db", "--split", "--max-items", "--host", "--port", "--device", "--config", "-c"],
    "demo": ["--out", "-o", "--fast", "--minutes", "--serve", "--no-serve", "--check", "--port"],
    "run": ["--force", "--serve"],
    "lineage": [],
    "export": ["--hf", "--gguf", "--quant", "--device"],
    "serve": ["--host", "--port", "--db", "--backend", "--upstream-url", "--upstream", "--gguf", "--quantize",
              "--max-batch", "--max-queue", "--api-docs", "--no-api-docs", "--device", "--config", "-c"],
    "keys create": ["--name", "--scopes", "--rpm", "--tpm", "--db", "--config", "-c"],
    "keys list": ["--db", "--config", "-c"],
    "keys revoke": ["--db", "--config", "-c"],
    "feedback export": ["--out", "-o", "--db", "--config", "-c"],
}


def _help(command: str) -> str:
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", sorted(TODAY_FLAGS))
def test_every_command_help_lists_todays_flags(command: str) -> None:
    shown = _help(command)
    missing = [flag for flag in TODAY_FLAGS[command] if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown)]
    assert missing == [], f"chatforge {command} --help lacks {missing}"


def test_train_help_shows_the_fields_descriptions_and_choices() -> None:
    shown = " ".join(_help("train").split())  # rich wraps long help over lines
    assert "learning rate" in shown
    assert "lora|full" in shown  # choices from the field's Literal
    assert TrainConfig.model_fields["max_length"].description in shown


def _undocumented(exposed: list[tuple[type[BaseModel], str]]) -> list[str]:
    return sorted({f"{model.__name__}.{path}" for model, path in exposed
                   if not (config_field(model, path).description or "").strip()})


def test_every_config_field_on_the_cli_has_a_description() -> None:
    assert len(EXPOSED_FIELDS) > 50  # the commands registered their options (prepare, train, eval, serve, ...)
    assert _undocumented(EXPOSED_FIELDS) == []


def test_an_exposed_field_without_a_description_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    class Planted(BaseModel):
        documented: int = Field(default=1, description="a documented knob")
        section: EvalConfig = EvalConfig()
        bare: int = 2

    monkeypatch.setattr(chatforge.cli.options, "EXPOSED_FIELDS", [])
    ConfigOptions(Planted, [field_option("documented"), field_option("bare"), field_option("section.split", "--s")])
    assert chatforge.cli.options.EXPOSED_FIELDS == [(Planted, "documented"), (Planted, "bare"), (Planted, "section.split")]
    assert _undocumented(chatforge.cli.options.EXPOSED_FIELDS) == ["Planted.bare"]


def test_options_default_to_not_given_and_map_onto_dotted_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chatforge.cli.options, "EXPOSED_FIELDS", [])
    seen: dict[str, Any] = {}
    options = ConfigOptions(TrainConfig, [field_option("lr"), field_option("lora.r", "--lora-r"),
                                          field_option("packing"), field_option("method")])
    local = typer.Typer()

    @local.command()
    @options.add_to
    def go(**given: Any) -> None:
        seen.update(options.overrides(given))

    assert runner.invoke(local, ["--lr", "0.5", "--lora-r", "4", "--no-packing"]).exit_code == 0
    assert seen == {"lr": 0.5, "lora.r": 4, "packing": False, "method": None}
    bad = runner.invoke(local, ["--method", "qlora"])
    assert bad.exit_code == 2 and "qlora" in bad.output


def test_the_cli_starts_without_torch_or_sqlalchemy() -> None:
    """`chatforge --help` stays fast: the commands import torch (+8-10 s) and SQLAlchemy/FastAPI (+3 s) only when run."""
    code = "import sys, chatforge.cli; print(sorted({'torch', 'sqlalchemy', 'fastapi', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
