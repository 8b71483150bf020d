"""Write a dataset directory so that a failed run never damages the previous one.

Use it like this (as `prepare` does)::

    with staged_output(out) as staging:       # a fresh hidden sibling of `out`
        write_jsonl(staging / "train.jsonl", train)
        ...                                   # an exception here deletes `staging`; `out` stays byte-identical
    # only here, after everything was written, `staging` takes the place of `out`

The swap: a new `out` is a rename; an existing one that holds only files prepare writes is renamed aside, the
staging folder renamed to `out`, and the old one deleted. An existing `out` that also holds other files (a README
someone put there) keeps them: prepare's files are moved in one by one, each with an atomic rename.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chatforge.data.formats import InputError

DATASET_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "duplicates.jsonl", "card.md",
                 "card.json", "token_lengths.png", "manifest.json")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty folder next to `out`; on success it replaces `out`, on an exception it is removed."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out is a file; give a folder for the dataset")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.prepare-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _replace(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(out: Path, staging: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    if all(entry.name in DATASET_FILES for entry in out.iterdir()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    for written in staging.iterdir():
        os.replace(written, out / written.name)
