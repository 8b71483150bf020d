"""`chatforge demo | run | lineage`: the whole loop on the sample or from one project file, and where a run came from."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from chatforge.cli.common import DEFAULT_PROJECT_FILE, app, console, fail, load_project, log_line
from chatforge.cli.evaluate import metric_table
from chatforge.cli.options import config_option
from chatforge.cli.serve import serve_run
from chatforge.config import ConfigError, TrainConfig, merge_overrides
from chatforge.core.rundir import RunDir
from chatforge.data.card import summary_lines
from chatforge.demo import write_demo_project
from chatforge.pipeline import PipelineError, lineage_lines, run_project

# Imported inside the commands that need them: train.loop, evaluate.run_eval and models.export import torch (+8-10 s
# wall, 3 s CPU at startup; see cli/stages.py).


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="where the demo writes its project and outputs")] = Path("demo-out"),
    fast: Annotated[bool, typer.Option("--fast", envvar="DEMO_FAST", help="a tiny model trained from scratch (~2 min) instead of SmolLM2-135M-Instruct")] = False,
    minutes: Annotated[float | None, typer.Option(help="training time budget guarding the recipe's steps (default 30, or 1 with --fast)")] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="serve the result at the end")] = True,
    check: Annotated[bool, typer.Option("--check", help="serve, answer one chat request with the new key, then stop (for CI)")] = False,
    port: Annotated[int | None, typer.Option(help="port to serve on (default 8000, or a free one when 8000 is taken)")] = None,
) -> None:
    """The whole loop on the bundled sample: prepare -> fine-tune -> evaluate against the base -> serve."""
    from chatforge.evaluate.run_eval import EvalError  # lazy: torch
    from chatforge.train.loop import TrainError  # lazy: torch

    budget = minutes if minutes is not None else (1.0 if fast else 30.0)
    console.rule(f"chatforge demo ({'tiny model, fast' if fast else 'SmolLM2-135M-Instruct + LoRA'})")
    try:
        project_file = write_demo_project(out, fast, budget, log=log_line)
        project = load_project(project_file)
        outcomes = run_project(project, base_dir=project_file.parent, log=log_line)
    except (ConfigError, PipelineError, TrainError, EvalError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    dataset_dir = next(o.out_dir for o in outcomes if o.stage == "prepare")
    run_dir = next(o.out_dir for o in outcomes if o.stage == "train")
    eval_dir = next(o.out_dir for o in outcomes if o.stage == "eval")
    print_demo_summary(dataset_dir, run_dir, eval_dir)
    console.print(f"project file: {project_file}  (rerun with `chatforge run {project_file}`)", highlight=False)
    if serve or check:
        serve_port = port if port is not None else free_port_near(project.serve.host, project.serve.port)
        serve_cfg = project.serve.model_copy(update={"port": serve_port})
        serve_run(str(run_dir), serve_cfg, demo_key=True, check=check)


def free_port_near(host: str, port: int) -> int:
    """`port` when it is free on `host`, else a free one the system picks (said on the console)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind((host, 0))
        free = int(probe.getsockname()[1])
    console.print(f"[yellow]port {port} is taken; serving on {free} instead (or pass --port / make demo PORT=...)[/]")
    return free


def print_demo_summary(dataset_dir: Path, run_dir: Path, eval_dir: Path) -> None:
    """The card's headline, the metric table with deltas, and where the report is."""
    card = json.loads((dataset_dir / "card.json").read_text(encoding="utf-8"))
    console.rule("dataset")
    for line in summary_lines(card):
        console.print(f"  {line}", highlight=False)
    counts = json.loads(RunDir(run_dir).manifest_file.read_text(encoding="utf-8")).get("counts", {})
    if counts.get("stopped_by") == "time budget":
        console.print(f"[bold red]TRAINING WAS CUT SHORT by the time budget: {counts.get('steps')} of "
                      f"{counts.get('planned_steps')} planned steps.[/] The results below are weaker than the recipe's; "
                      "rerun with a larger --minutes (or on a quieter machine) for the full run.", highlight=False)
    metrics = json.loads((eval_dir / RunDir.EVAL_METRICS_FILE).read_text(encoding="utf-8"))
    console.rule("fine-tuned vs base")
    console.print(metric_table(metrics))
    bias = metrics.get("bias")
    if bias:
        base_bias = metrics.get("bias_baseline")
        base_note = f" (the base model: {base_bias['flagged_pairs']})" if base_bias else ""
        console.print(f"bias probe: {bias['flagged_pairs']} of {bias['total_pairs']} counterfactual pairs flagged{base_note}")
    console.print(f"[bold green]report:[/] {escape(str(eval_dir / 'report.html'))}", highlight=False)


@app.command("run")
def run_command(
    config_file: Annotated[Path | None, typer.Argument(help="project file (default ./chatforge.yaml)")] = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="rerun this stage even if unchanged (prepare, train, eval); repeatable")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="then serve the run (serve: section of the project file)")] = False,
) -> None:
    """prepare -> train -> eval (-> serve) from the project file; stages whose inputs and config are unchanged are skipped."""
    from chatforge.evaluate.run_eval import EvalError  # lazy: torch
    from chatforge.train.loop import TrainError  # lazy: torch

    path = config_file or DEFAULT_PROJECT_FILE
    if not path.exists():
        fail(f"{path}: no project file; `chatforge init` writes one")
    try:
        project = load_project(path)
        outcomes = run_project(project, base_dir=path.resolve().parent, force=set(force or ()), log=log_line)
    except (ConfigError, PipelineError, TrainError, EvalError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for outcome in outcomes:
        state = "[yellow]skipped[/]" if outcome.skipped else "[green]ran[/]"
        console.print(f"{outcome.stage:8s} {state}  {outcome.out_dir}  ({outcome.reason})", highlight=False)
    if serve:
        run_dir = next(o.out_dir for o in outcomes if o.stage == "train")
        serve_run(str(run_dir), project.serve)


@app.command("lineage")
def lineage_command(run: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Print the chain behind a run: source files -> dataset -> run -> evals -> exports."""
    try:
        lines = lineage_lines(run)
    except (PipelineError, ValueError) as exc:
        fail(str(exc))
    for line in lines:
        console.print(line, highlight=False, markup=False)


ExportDeviceOption = config_option(TrainConfig, "device", note="(for merging; default train.device)")


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="run directory")],
    hf: Annotated[Path | None, typer.Option("--hf", help="write a Hugging Face model directory (adapter merged)")] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="write one GGUF file for llama.cpp / Ollama")] = None,
    quant: Annotated[str, typer.Option(help="GGUF weights: f16, q8_0 or f32")] = "q8_0",
    device: ExportDeviceOption = None,
) -> None:
    """Export a run: a merged HF model directory (--hf) and/or a GGUF with the chat template embedded (--gguf)."""
    from chatforge.models.export import ExportError, export_gguf, export_hf  # lazy: torch

    if hf is None and gguf is None:
        fail("export needs --hf DIR and/or --gguf FILE")
    try:
        device = merge_overrides(load_project(None).train, {"device": device}).device
        if hf is not None:
            console.print(f"[bold green]HF model:[/] {escape(str(export_hf(run, hf, device)))}", highlight=False)
        if gguf is not None:
            path = export_gguf(run, gguf, quant, device)
            console.print(f"[bold green]GGUF ({quant}):[/] {escape(str(path))}  ({path.stat().st_size / 2**20:.0f} MiB; "
                          f"`llama-cli -m {escape(str(path))}` or an Ollama Modelfile `FROM {escape(str(path))}`)",
                          highlight=False)
    except (ConfigError, ExportError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
