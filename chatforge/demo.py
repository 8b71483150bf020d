"""The bundled sample for `make demo`: the English ChatterBot corpus, read from the installed package.

Use it like this::

    prepare(demo_inputs(), Path("demo-out/dataset"), PrepareConfig())

The corpus (BSD licence) ships as YAML inside the `chatterbot-corpus` package; it is never copied into this repo.
"""

from __future__ import annotations

from pathlib import Path


def demo_inputs(language: str = "english") -> list[Path]:
    """The folder of the corpus's YAML files for `language`; a clear error if the package is missing."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise ValueError("the demo data needs the 'chatterbot-corpus' package: pip install chatterbot-corpus") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        raise ValueError(f"chatterbot-corpus has no '{language}' folder at {folder}")
    return [folder]
