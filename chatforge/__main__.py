"""`python -m chatforge ...` is the same as the `chatforge` command."""

from chatforge.cli import app

if __name__ == "__main__":
    app()
