"""`chatforge run | lineage`: the whole loop from one project file, and where a run came from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chatforge.cli.common import DEFAULT_PROJECT_FILE, app, console, fail, load_project, log_line
from chatforge.config import ConfigError


@app.command("run")
def run_command(
    config_file: Annotated[Path | None, typer.Argument(help="project file (default ./chatforge.yaml)")] = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="rerun this stage even if unchanged (prepare, train, eval); repeatable")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="then serve the run (serve: section of the project file)")] = False,
) -> None:
    """prepare -> train -> eval (-> serve) from the project file; stages whose inputs and config are unchanged are skipped."""
    from chatforge.evaluate.run_eval import EvalError
    from chatforge.pipeline import PipelineError, run_project
    from chatforge.train.loop import TrainError

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
        from chatforge.cli.serve import serve_run

        run_dir = next(o.out_dir for o in outcomes if o.stage == "train")
        serve_run(str(run_dir), project.serve)


@app.command("lineage")
def lineage_command(run: Annotated[Path, typer.Argument(help="run directory")]) -> None:
    """Print the chain behind a run: source files -> dataset -> run -> evals -> exports."""
    from chatforge.pipeline import PipelineError, lineage_lines

    try:
        lines = lineage_lines(run)
    except (PipelineError, ValueError) as exc:
        fail(str(exc))
    for line in lines:
        console.print(line, highlight=False, markup=False)
