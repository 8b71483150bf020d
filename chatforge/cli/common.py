"""What every `chatforge` command shares: the typer app, the consoles, one-line errors, the project file.

Use it like this (in a command module)::

    @app.command()
    def thing(...) -> None:
        try:
            ...
        except (ConfigError, ValueError) as exc:
            fail(str(exc))              # one red line, exit code 2
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from chatforge.config import ProjectConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train your own ChatGPT on your own conversations.")
console = Console(stderr=False)
err_console = Console(stderr=True)
USER_ERROR_EXIT = 2
DEFAULT_PROJECT_FILE = Path("chatforge.yaml")


def fail(message: str) -> None:
    """Print one error line and exit 2 (bad input, never a traceback)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(USER_ERROR_EXIT)


def load_project(config: Path | None) -> ProjectConfig:
    """The project file given, else ./chatforge.yaml when present, else defaults."""
    if config is None and DEFAULT_PROJECT_FILE.exists():
        config = DEFAULT_PROJECT_FILE
    return ProjectConfig.load(config)


def log_line(message: str) -> None:
    console.print(f"[dim]·[/] {message}", highlight=False)
