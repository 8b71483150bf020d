"""`chatforge init | prepare | demo | train | inspect | ensemble | sweep`: the data and training commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from chatforge.cli.common import DEFAULT_PROJECT_FILE, DEVICE_OPTION_HELP, app, console, fail, load_project, log_line
from chatforge.config import (
    ConfigError,
    merge_overrides,
    parse_split,
    starter_yaml,
)


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


@app.command()
def prepare(
    inputs: Annotated[list[Path], typer.Argument(help="files or folders of conversations")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output dataset directory")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (default ./chatforge.yaml)")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="force a format: openai, sharegpt, alpaca, csv, tsv, chatterbot, transcript, parquet")] = None,
    strict: Annotated[bool | None, typer.Option("--strict/--no-strict", help="stop at the first invalid record")] = None,
    trailing_user: Annotated[str | None, typer.Option(help="conversations ending with user turns: trim (keep the rest) or reject")] = None,
    split: Annotated[str | None, typer.Option(help="train/val/test ratios, e.g. 80/10/10")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for split, balance and augmentation")] = None,
    model: Annotated[str | None, typer.Option(help="tokenizer for token counts: HF dir, hub id or .gguf")] = None,
    chat_template: Annotated[str | None, typer.Option(help="named chat template if the tokenizer has none")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="longest example in tokens")] = None,
    overflow: Annotated[str | None, typer.Option(help="what to do past max-tokens: split, truncate or drop")] = None,
    clean: Annotated[bool | None, typer.Option("--clean/--no-clean")] = None,
    pii: Annotated[bool | None, typer.Option("--pii/--no-pii", help="redact PII and secrets")] = None,
    dedup: Annotated[bool | None, typer.Option("--dedup/--no-dedup")] = None,
    dedup_threshold: Annotated[float | None, typer.Option(help="near-duplicate Jaccard threshold")] = None,
    fit: Annotated[bool | None, typer.Option("--fit/--no-fit", help="count tokens and fit to max-tokens")] = None,
    balance: Annotated[bool | None, typer.Option("--balance/--no-balance")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment")] = None,
    workers: Annotated[int | None, typer.Option(help="processes for cleaning/redaction (0 = all cores)")] = None,
) -> None:
    """Clean, redact, deduplicate, fit, balance and split conversations into a dataset with a data card."""
    from chatforge.data.card import summary_lines
    from chatforge.data.formats import InputError
    from chatforge.data.prepare import StrictModeError
    from chatforge.data.prepare import prepare as run_prepare

    try:
        project = load_project(config)
        overrides: dict[str, Any] = {
            "format": fmt, "strict": strict, "validate.trailing_user": trailing_user, "split.seed": seed, "balance.seed": seed, "augment.seed": seed,
            "fit.model": model, "fit.chat_template": chat_template, "fit.max_tokens": max_tokens,
            "fit.overflow": overflow, "clean.enabled": clean, "pii.enabled": pii, "dedup.enabled": dedup,
            "dedup.threshold": dedup_threshold, "fit.enabled": fit, "balance.enabled": balance,
            "augment.enabled": augment, "workers": workers,
            "split.ratios": parse_split(split) if split else None,
        }
        cfg = merge_overrides(project.prepare, overrides)
        report = run_prepare(list(inputs), out, cfg, log=log_line)
    except (ConfigError, InputError, StrictModeError, ValueError) as exc:  # ValueError: a bad --split or --model
        fail(str(exc))
    console.print(f"[bold green]dataset ready:[/] {report.out_dir}  (card: {report.out_dir / 'card.md'})")
    for line in summary_lines(report.card):
        console.print(f"  {line}", highlight=False)


@app.command("train")
def train_command(
    config_file: Annotated[Path | None, typer.Argument(help="project file (chatforge.yaml)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="project file (same as the argument)")] = None,
    data: Annotated[str | None, typer.Option(help="prepared dataset directory")] = None,
    model: Annotated[str | None, typer.Option(help="base model: HF dir, hub id, .gguf or a packaged name (default Gemma 3 270M)")] = None,
    chat_template: Annotated[str | None, typer.Option(help="chat template NAME (chatml, gemma, llama3) or FILE.jinja; "
                                                      "default: the tokenizer's own")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="run directory")] = None,
    method: Annotated[str | None, typer.Option(help="lora or full")] = None,
    train_on: Annotated[str | None, typer.Option(help="assistant, last_assistant or all")] = None,
    packing: Annotated[bool | None, typer.Option("--packing/--no-packing")] = None,
    max_length: Annotated[int | None, typer.Option(help="tokens per sequence")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, adam, rmsprop or sgd")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant, linear or cosine")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per step per process")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="micro-batches per optimizer step")] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    eval_every: Annotated[int | None, typer.Option()] = None,
    save_every: Annotated[int | None, typer.Option()] = None,
    histogram_every: Annotated[int | None, typer.Option(help="steps between weight/grad histograms (default: ~5 per run)")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="stop training after this much step time (then export)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
    merge: Annotated[bool | None, typer.Option("--merge/--no-merge", help="export the adapter merged into the base")] = None,
    device: Annotated[str | None, typer.Option(help=DEVICE_OPTION_HELP)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in --out")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the memory/time estimate only")] = False,
) -> None:
    """Fine-tune a base model on a prepared dataset (LoRA or full), with checkpoints, early stopping, TensorBoard."""
    from chatforge.core.rundir import RunDir
    from chatforge.train.loop import TrainError, train

    try:
        project = load_project(config or config_file)
        overrides: dict[str, Any] = {
            "data": data, "model": model, "chat_template": chat_template, "out": out, "method": method, "train_on": train_on, "packing": packing,
            "max_length": max_length, "lr": lr, "optimizer": optimizer, "schedule": schedule,
            "batch_size": batch_size, "grad_accum": grad_accum, "epochs": epochs, "max_steps": max_steps,
            "eval_every": eval_every, "save_every": save_every, "seed": seed, "lora.r": lora_r, "merge": merge,
            "histogram_every": histogram_every, "max_minutes": max_minutes,
            "device": device,
        }
        cfg = merge_overrides(project.train, overrides)
        report = train(cfg, resume=resume, dry_run=dry_run, log=log_line)
    except (ConfigError, TrainError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if dry_run or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    best = f"{report.best_val_loss:.4f}" if report.best_val_loss is not None else "n/a"
    console.print(f"[bold green]run ready:[/] {RunDir(report.run_dir).model_dir}  ({report.steps} of {report.planned_steps} "
                  f"steps, best val loss {best}{f', stopped by {report.stopped_by}' if report.stopped_by else ''})")


@app.command()
def inspect(
    dataset: Annotated[Path, typer.Argument(help="prepared dataset dir or a JSONL file")],
    model: Annotated[str | None, typer.Option(help="tokenizer: HF dir, hub id or .gguf")] = None,
    chat_template: Annotated[str | None, typer.Option(help="chat template NAME or FILE.jinja (default: the tokenizer's own)")] = None,
    train_on: Annotated[str, typer.Option(help="assistant, last_assistant or all")] = "assistant",
    index: Annotated[int, typer.Option(help="which record")] = 0,
    split: Annotated[str, typer.Option(help="which split file of a dataset dir")] = "train",
) -> None:
    """Show one conversation as the model sees it, trained tokens highlighted: check your loss mask."""
    from rich.text import Text

    from chatforge.core.records import read_jsonl
    from chatforge.models.source import load_tokenizer
    from chatforge.core.examples import IGNORE, tokenize_conversation

    path = dataset / f"{split}.jsonl" if dataset.is_dir() else dataset
    try:
        records = list(read_jsonl(path))
        tokenizer = load_tokenizer(model, chat_template)
        if not 0 <= index < len(records):
            fail(f"{path}: --index {index} out of range (0..{len(records) - 1})")
        example = tokenize_conversation(tokenizer, records[index]["messages"], train_on, 10**9)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    text = Text()
    for token_id, label in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([token_id])
        text.append(piece, style="bold black on green" if label != IGNORE else "dim")
    console.print(text)
    console.print(f"\n{example.trained_tokens} of {len(example.input_ids)} tokens carry loss (highlighted); "
                  f"record {records[index].get('id')} from {records[index].get('meta', {}).get('source')}")


@app.command("ensemble")
def ensemble_command(
    runs: Annotated[list[Path], typer.Argument(help="run directories to combine (two or more)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the combined run")],
    weights: Annotated[str | None, typer.Option(help="one weight per run, comma-separated, e.g. 0.5,0.5 (normalised)")] = None,
    soup: Annotated[bool, typer.Option("--soup", help="average the runs' weights into one model (runs must share a base)")] = False,
    device: Annotated[str | None, typer.Option(help=f"{DEVICE_OPTION_HELP} (--soup; default train.device)")] = None,
) -> None:
    """Combine runs: average their next-token probabilities, or with --soup their weights, into one servable run."""
    from chatforge.train.ensemble import make_ensemble, parse_weights

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
    from rich.markup import escape
    from rich.table import Table

    from chatforge.train.sweep import sweep

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
