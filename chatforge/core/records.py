"""The record every stage passes on: an OpenAI chat JSONL line with a stable id and its source.

Use it like this::

    record = make_record([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                         source="tickets.csv", line=17, meta={"category": "billing"})
    record["id"], record["meta"]["source"]        # 'c1f0…', 'tickets.csv:17'

Records are plain dicts so they serialise as they are: {"id", "messages", "meta", optional "weight"}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

Message = dict[str, str]
Record = dict[str, Any]
ROLES = ("system", "user", "assistant")


def make_record(
    messages: list[Message],
    source: str,
    line: int,
    meta: dict[str, Any] | None = None,
    weight: float | None = None,
) -> Record:
    """Build a record whose id depends only on where it came from and what it said (stable across reruns)."""
    record_meta = dict(meta or {})
    record_meta["source"] = f"{source}:{line}"
    digest = hashlib.sha1(f"{source}:{line}".encode("utf-8", "surrogatepass"))
    for message in messages:  # surrogatepass: a lone surrogate from a JSON escape must not crash the read
        role, content = str(message.get("role")), str(message.get("content"))
        digest.update(b"\x00" + role.encode("utf-8", "surrogatepass") + b"\x01" + content.encode("utf-8", "surrogatepass"))
    record: Record = {"id": digest.hexdigest()[:16], "messages": messages, "meta": record_meta}
    if weight is not None:
        record["weight"] = weight
    return record


def conversation_text(record: Record) -> str:
    """All message contents joined by newlines: what dedup and augmentation look at."""
    return "\n".join(str(m.get("content", "")) for m in record["messages"])


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records one JSON object per line (UTF-8, no ASCII escaping); returns how many were written.

    A lone surrogate (which UTF-8 cannot hold, from a JSON '\\ud800' escape) is written as '?' rather than failing.
    """
    count = 0
    with path.open("w", encoding="utf-8", errors="replace") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Read a JSONL file written by `write_jsonl`: `for record in read_jsonl(Path("data/train.jsonl")): ...`.

    Blank lines are skipped. A line that is not a JSON object raises ValueError naming it, e.g.
    'data/train.jsonl:17: not valid JSON (Expecting value at column 1)', so a caller can show it as a one-line error.
    """
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}:{line_number}: JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield record
