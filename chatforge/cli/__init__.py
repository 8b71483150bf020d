"""The `chatforge` command: a thin layer that parses flags, calls a stage and prints its summary.

Use it like this::

    chatforge init                                  # writes a commented chatforge.yaml
    chatforge prepare data/ tickets.csv --out ds    # see `chatforge prepare --help`
    chatforge train --data ds --out runs/r1         # fine-tune (LoRA by default)
    chatforge eval runs/r1                          # metrics, bias probe, report.html
    chatforge serve runs/r1                         # the OpenAI-compatible API and chat page

Errors in the user's input print one line (`error: file:line: reason`) and exit with code 2. Each module here
registers its commands on the one typer `app`.
"""

from chatforge.cli import stages  # noqa: F401, I001  (importing registers the commands, in help order)
from chatforge.cli import evaluate, loop, serve  # noqa: F401
from chatforge.cli.common import app

__all__ = ["app"]
