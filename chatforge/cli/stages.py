"""`chatforge init | prepare | demo | train | inspect | ensemble | sweep`: the data and training commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from chatforge.cli.common import DEFAULT_PROJECT_FILE, app, console, fail, load_project, log_line
from chatforge.cli.options import ConfigOptions, config_option, field_option
from chatforge.config import ConfigError, PrepareConfig, TrainConfig, merge_overrides, starter_yaml
from chatforge.core.records import read_jsonl
from chatforge.core.rundir import RunDir
from chatforge.data.card import summary_lines
from chatforge.data.formats import InputError
from chatforge.data.prepare import StrictModeError
from chatforge.data.prepare import prepare as run_prepare
from chatforge.models.source import load_tokenizer

# Modules that import torch are imported inside the commands that need them: torch adds 8-10 s wall (3 s CPU) to every
# `chatforge` start, `--help` included (measured: `import chatforge.cli` alone vs with chatforge.train.loop).


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the project file")] = DEFAULT_PROJECT_FILE,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a starter chatforge.yaml with every option commented."""
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to overwrite it")
    out.write_text(starter_yaml(), encoding="utf-8")
    console.print(f"wrote {out}")


PREPARE_OPTIONS = ConfigOptions(PrepareConfig, [
    field_option("format"), field_option("strict"), field_option("validate.trailing_user", "--trailing-user"),
    field_option("split.ratios", "--split"),
    field_option("split.seed", "--seed", also_sets=("balance.seed", "augment.seed"), note="(also of balance and augment)"),
    field_option("fit.model", "--model"), field_option("fit.chat_template", "--chat-template"),
    field_option("fit.max_tokens", "--max-tokens"), field_option("fit.overflow", "--overflow"),
    field_option("clean.enabled", "--clean"), field_option("pii.enabled", "--pii"),
    field_option("dedup.enabled", "--dedup"), field_option("dedup.threshold", "--dedup-threshold"),
    field_option("fit.enabled", "--fit"), field_option("balance.enabled", "--balance"),
    field_option("augment.enabled", "--augment"), field_option("workers"),
])


@app.command()
@PREPARE_OPTIONS.add_to
def prepare(
    inputs: Annotated[list[Path], typer.Argument(help="files or folders of conversations")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output dataset directory")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (default ./chatforge.yaml)")] = None,
    **options: Any,
) -> None:
    """Clean, redact, deduplicate, fit, balance and split conversations into a dataset with a data card."""
    try:
        cfg = merge_overrides(load_project(config).prepare, PREPARE_OPTIONS.overrides(options))
        report = run_prepare(list(inputs), out, cfg, log=log_line)
    except (ConfigError, InputError, StrictModeError, ValueError) as exc:  # ValueError: e.g. a bad --model
        fail(str(exc))
    console.print(f"[bold green]dataset ready:[/] {report.out_dir}  (card: {report.out_dir / 'card.md'})")
    for line in summary_lines(report.card):
        console.print(f"  {line}", highlight=False)


TRAIN_OPTIONS = ConfigOptions(TrainConfig, [
    field_option("data"), field_option("model"), field_option("chat_template"), field_option("out", "--out", "-o"),
    field_option("method"), field_option("train_on"), field_option("packing"), field_option("max_length"),
    field_option("lr"), field_option("optimizer"), field_option("schedule"), field_option("batch_size"),
    field_option("grad_accum"), field_option("epochs"), field_option("max_steps"), field_option("eval_every"),
    field_option("save_every"), field_option("histogram_every"), field_option("max_minutes"), field_option("seed"),
    field_option("lora.r", "--lora-r"), field_option("merge"), field_option("device"),
])


@app.command("train")
@TRAIN_OPTIONS.add_to
def train_command(
    config_file: Annotated[Path | None, typer.Argument(help="project file (chatforge.yaml)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (same as the argument)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in --out")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the memory/time estimate only")] = False,
    **options: Any,
) -> None:
    """Fine-tune a base model on a prepared dataset (LoRA or full), with checkpoints, early stopping, TensorBoard."""
    from chatforge.train.loop import TrainError, train  # lazy: torch

    try:
        cfg = merge_overrides(load_project(config or config_file).train, TRAIN_OPTIONS.overrides(options))
        report = train(cfg, resume=resume, dry_run=dry_run, log=log_line)
    except (ConfigError, TrainError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if dry_run or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    best = f"{report.best_val_loss:.4f}" if report.best_val_loss is not None else "n/a"
    console.print(f"[bold green]run ready:[/] {RunDir(report.run_dir).model_dir}  ({report.steps} of {report.planned_steps} "
                  f"steps, best val loss {best}{f', stopped by {report.stopped_by}' if report.stopped_by else ''})")


# inspect shows what train would see, so its options are train's fields (without reading the project file)
InspectModelOption = config_option(TrainConfig, "model", note="(its tokenizer)")
InspectTemplateOption = config_option(TrainConfig, "chat_template")
InspectTrainOnOption = config_option(TrainConfig, "train_on", note="(default assistant)")


@app.command()
def inspect(
    dataset: Annotated[Path, typer.Argument(help="prepared dataset dir or a JSONL file")],
    model: InspectModelOption = None,
    chat_template: InspectTemplateOption = None,
    train_on: InspectTrainOnOption = None,
    index: Annotated[int, typer.Option(help="which record")] = 0,
    split: Annotated[str, typer.Option(help="which split file of a dataset dir")] = "train",
) -> None:
    """Show one conversation as the model sees it, trained tokens highlighted: check your loss mask."""
    from chatforge.core.examples import IGNORE, tokenize_conversation  # lazy: torch

    path = dataset / f"{split}.jsonl" if dataset.is_dir() else dataset
    try:
        records = list(read_jsonl(path))
        tokenizer = load_tokenizer(model, chat_template)
        if not 0 <= index < len(records):
            fail(f"{path}: --index {index} out of range (0..{len(records) - 1})")
        example = tokenize_conversation(tokenizer, records[index]["messages"], train_on or TrainConfig().train_on, 10**9)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    text = Text()
    for token_id, label in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([token_id])
        text.append(piece, style="bold black on green" if label != IGNORE else "dim")
    console.print(text)
    console.print(f"\n{example.trained_tokens} of {len(example.input_ids)} tokens carry loss (highlighted); "
                  f"record {records[index].get('id')} from {records[index].get('meta', {}).get('source')}")


EnsembleDeviceOption = config_option(TrainConfig, "device", note="(default train.device)")


@app.command("ensemble")
def ensemble_command(
    runs: Annotated[list[Path], typer.Argument(help="run directories to combine (two or more)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the combined run")],
    weights: Annotated[str | None, typer.Option(help="one weight per run, comma-separated, e.g. 0.5,0.5 (normalised)")] = None,
    soup: Annotated[bool, typer.Option("--soup", help="average the runs' weights into one model (runs must share a base)")] = False,
    device: EnsembleDeviceOption = None,
) -> None:
    """Combine runs: average their next-token probabilities, or with --soup their weights, into one servable run."""
    from chatforge.train.ensemble import make_ensemble, parse_weights  # lazy: torch

    try:
        cfg = merge_overrides(load_project(None).train, {"device": device})
        out_dir = make_ensemble(runs, out, parse_weights(weights), soup=soup, device=cfg.device)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    kind = "model soup (one full model)" if soup else "probability ensemble"
    console.print(f"[bold green]{kind} ready:[/] {out_dir}  ({len(runs)} runs; evaluate or serve it like any run)")


@app.command("sweep")
def sweep_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="sweep directory: a run dir per trial, sweep.db, leaderboard")],
    config_file: Annotated[Path | None, typer.Argument(help="project file (chatforge.yaml) with train: and sweep:")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (same as the argument)")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default sqlite:///OUT/sweep.db); a "
                                                     "PostgreSQL URL shares one sweep between machines")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="skip finished trials; rerun failed and interrupted ones")] = False,
) -> None:
    """Train every combination of the sweep: values on top of train: and rank the runs by best val loss."""
    from chatforge.train.sweep import sweep  # lazy: torch

    try:
        project = load_project(config or config_file)
        report = sweep(project.train, project.sweep, out, storage=storage, resume=resume, log=log_line)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    table = Table("rank", "trial", *(escape(key) for key in project.sweep), "best val loss", "steps", "note")
    for rank, row in enumerate(report.trials, start=1):
        loss = f"{row['best_val_loss']:.4f}" if row["best_val_loss"] is not None else "n/a"
        note = row["error"] or {"complete": "stopped early" if row["stopped_early"] else ""}.get(row["state"], row["state"])
        table.add_row(str(rank) if row["state"] == "complete" else "-", str(row["trial"]),
                      *(escape(str(value)) for value in row["params"].values()), loss, str(row["steps"] or ""), escape(note))
    console.print(table)
    best = report.best
    console.print(f"[bold green]sweep ready:[/] {report.out_dir / 'leaderboard.md'}  ({report.done} trained, "
                  f"{report.skipped} skipped, {report.failed} failed)"
                  + (f"; best run {escape(str(best['run_dir']))}" if best else ""), highlight=False)
    if report.failed:
        console.print("rerun the failed trials with --resume once their cause is fixed", highlight=False)
