"""Read conversations from the formats people actually have, each into OpenAI chat records.

Use it like this::

    fmt = detect_format(path)                        # "openai", "sharegpt", "alpaca", "csv", "chatterbot", ...
    for item in read_file(path, fmt, FormatOptions()):
        if isinstance(item, Rejection): ...          # a line that could not be turned into a record, with reason
        else: ...                                    # a record dict (see records.make_record)

Problems with a whole file (missing, empty, binary, unknown format) raise `InputError` with a one-line message that
names the file; problems with one line/row/conversation become a `Rejection` so nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chatforge.config import FormatOptions
from chatforge.data.records import Message, Record, make_record

FORMATS = ("openai", "sharegpt", "alpaca", "csv", "tsv", "chatterbot", "transcript", "parquet")
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
KNOWN_SUFFIXES = JSON_SUFFIXES | {".csv", ".tsv", ".yml", ".yaml", ".txt", ".parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}


class InputError(ValueError):
    """A whole input file cannot be read; the message is one line that starts with the file name."""


@dataclass(frozen=True)
class Rejection:
    """One input item that did not become a valid record: where it was, why, and what it held."""

    source: str
    line: int
    reason: str
    raw: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "record": self.raw}


Item = Record | Rejection


def _head(path: Path, size: int = 8192) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def check_readable(path: Path) -> None:
    """Raise InputError for a missing, empty or binary file (parquet is binary by design)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    head = _head(path)
    if not head.strip():
        raise InputError(f"{path}: file holds only whitespace")
    if path.suffix.lower() == ".parquet":
        return
    if b"\x00" in head:
        raise InputError(f"{path}: looks like a binary file (NUL bytes); expected text such as JSONL, CSV or YAML")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end of the sample is fine
            raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def _json_object_format(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


def detect_format(path: Path) -> str:
    """Guess a file's format from its suffix and first record; InputError if it can't be told."""
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    text = _head(path, 65536).decode("utf-8", errors="ignore")
    if suffix in {".yml", ".yaml"}:
        if "conversations" in text:
            return "chatterbot"
        raise InputError(f"{path}: YAML without a 'conversations:' list; expected the ChatterBot corpus layout")
    if suffix in JSON_SUFFIXES or text.lstrip()[:1] in {"{", "["}:
        stripped = text.lstrip()
        first: Any = None
        try:
            if stripped.startswith("["):
                first = (json.loads(path.read_text(encoding="utf-8")) or [None])[0]
            else:
                first = json.loads(stripped.splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            first = None
        fmt = _json_object_format(first)
        if fmt:
            return fmt
        for key, fmt_name in (('"messages"', "openai"), ('"conversations"', "sharegpt"), ('"instruction"', "alpaca")):
            if key in text:
                return fmt_name
        raise InputError(
            f"{path}: JSON records without 'messages', 'conversations' or 'instruction'/'output'; "
            "cannot tell the format (use --format)"
        )
    if suffix == ".txt" or suffix == "":
        return "transcript"
    raise InputError(f"{path}: unknown format for suffix '{suffix}' (known: {', '.join(sorted(KNOWN_SUFFIXES))})")


def read_file(path: Path, fmt: str, options: FormatOptions) -> Iterator[Item]:
    """Yield records and rejections from one file in the given format."""
    check_readable(path)
    source = str(path)
    if fmt in {"openai", "sharegpt", "alpaca"}:
        yield from _read_json_records(path, fmt, source)
    elif fmt in {"csv", "tsv"}:
        yield from _read_table(path, "\t" if fmt == "tsv" or path.suffix.lower() == ".tsv" else ",", options, source)
    elif fmt == "chatterbot":
        yield from _read_chatterbot(path, source)
    elif fmt == "transcript":
        yield from _read_transcript(path, options, source)
    elif fmt == "parquet":
        yield from _read_parquet(path, options, source)
    else:
        raise InputError(f"{path}: unknown format '{fmt}' (known: {', '.join(FORMATS)})")


def record_from_object(obj: Any, fmt: str, source: str, line: int) -> Item:
    """Turn one parsed JSON/parquet object in `fmt` into a record, or a Rejection saying what is missing."""
    if not isinstance(obj, dict):
        return Rejection(source, line, f"expected a JSON object, got {type(obj).__name__}", obj)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if fmt == "openai":
        messages = obj.get("messages")
        if not isinstance(messages, list):
            return Rejection(source, line, "field 'messages' is missing or not a list", obj)
        parsed: list[Message] = []
        for position, message in enumerate(messages, start=1):
            if not isinstance(message, dict):
                return Rejection(source, line, f"message {position} is not an object", obj)
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            entry = {"role": message.get("role"), "content": content}
            if message.get("weight") in (0, 1):
                entry["weight"] = message["weight"]
            parsed.append(entry)
        weight = obj.get("weight") if isinstance(obj.get("weight"), (int, float)) else None
        return make_record(parsed, source, line, meta=meta, weight=weight)
    if fmt == "sharegpt":
        turns = obj.get("conversations")
        if not isinstance(turns, list):
            return Rejection(source, line, "field 'conversations' is missing or not a list", obj)
        parsed = []
        for position, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                return Rejection(source, line, f"turn {position} needs 'from' and 'value'", obj)
            speaker = str(turn["from"])
            parsed.append({"role": SHAREGPT_ROLES.get(speaker.lower(), speaker), "content": turn["value"]})
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            parsed.insert(0, {"role": "system", "content": obj["system"]})
        return make_record(parsed, source, line, meta=meta)
    if fmt == "alpaca":
        instruction, extra_input, output = obj.get("instruction"), obj.get("input") or "", obj.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return Rejection(source, line, "fields 'instruction' and 'output' must be strings", obj)
        prompt = f"{instruction}\n\n{extra_input}" if isinstance(extra_input, str) and extra_input.strip() else instruction
        parsed = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            parsed.insert(0, {"role": "system", "content": obj["system"]})
        return make_record(parsed, source, line, meta=meta)
    return Rejection(source, line, f"format '{fmt}' has no JSON object reader", obj)


def _read_json_records(path: Path, fmt: str, source: str) -> Iterator[Item]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        if first == "[":  # one JSON array of objects
            handle.seek(0)
            try:
                objects = json.load(handle)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{exc.lineno}: malformed JSON array: {exc.msg}") from None
            for index, obj in enumerate(objects, start=1):
                yield record_from_object(obj, fmt, source, index)
            return
        handle.seek(0)
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Rejection(source, line_number, f"malformed JSON: {exc.msg} (column {exc.colno})", line.rstrip("\n"))
                continue
            yield record_from_object(obj, fmt, source, line_number)


def _pick_column(header: list[str], candidates: list[str]) -> str | None:
    lowered = {name.strip().lower(): name for name in header}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _read_table(path: Path, delimiter: str, options: FormatOptions, source: str) -> Iterator[Item]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        question = _pick_column(header, options.question_columns)
        answer = _pick_column(header, options.answer_columns)
        if question is None or answer is None:
            raise InputError(
                f"{path}:1: no question/answer columns in header {header}; expected one of "
                f"{options.question_columns} and one of {options.answer_columns} (set prepare.formats in the config)"
            )
        category = _pick_column(header, [options.category_column])
        row_start = reader.line_num + 1
        for row in reader:
            line = row_start
            row_start = reader.line_num + 1
            if None in row:
                yield Rejection(source, line, f"row has {len(header) + len(row[None])} fields, header has {len(header)}", row)
                continue
            meta = {"category": row[category]} if category and row.get(category) else {}
            messages = [{"role": "user", "content": row.get(question)}, {"role": "assistant", "content": row.get(answer)}]
            yield make_record(messages, source, line, meta=meta)


def _read_chatterbot(path: Path, source: str) -> Iterator[Item]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8", errors="replace"), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(root, yaml.MappingNode):
        raise InputError(f"{path}: expected a mapping with a 'conversations:' list")
    sections = {key.value: value for key, value in root.value if isinstance(key, yaml.ScalarNode)}
    categories = sections.get("categories")
    category = None
    if isinstance(categories, yaml.SequenceNode) and categories.value:
        category = str(categories.value[0].value).lower()
    conversations = sections.get("conversations")
    if not isinstance(conversations, yaml.SequenceNode):
        raise InputError(f"{path}: 'conversations' must be a list of lists of statements")
    for node in conversations.value:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.SequenceNode) or not all(isinstance(n, yaml.ScalarNode) for n in node.value):
            yield Rejection(source, line, "a conversation must be a list of statements", None)
            continue
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": n.value} for i, n in enumerate(node.value)]
        yield make_record(messages, source, line, meta={"category": category} if category else {})


def _read_transcript(path: Path, options: FormatOptions, source: str) -> Iterator[Item]:
    labels = {label.lower(): "user" for label in options.user_labels}
    labels |= {label.lower(): "assistant" for label in options.assistant_labels}
    labels |= {label.lower(): "system" for label in options.system_labels}
    messages: list[Message] = []
    start_line = 0
    unlabeled: tuple[int, str] | None = None

    def flush() -> Iterator[Item]:
        nonlocal messages, unlabeled
        if unlabeled is not None:
            yield Rejection(source, unlabeled[0], f"line does not start with a speaker label ({', '.join(labels)})",
                            unlabeled[1])
        elif messages:
            yield make_record(messages, source, start_line)
        messages, unlabeled = [], None

    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = raw_line.rstrip("\n")
            if not line.strip():
                yield from flush()
                continue
            label, sep, rest = line.partition(":")
            role = labels.get(label.strip().lower()) if sep else None
            if not messages and unlabeled is None:
                start_line = line_number
            if role:
                messages.append({"role": role, "content": rest.strip()})
            elif messages:  # a continuation of the previous message
                messages[-1]["content"] += "\n" + line.strip()
            elif unlabeled is None:
                unlabeled = (line_number, line)
        yield from flush()


def _read_parquet(path: Path, options: FormatOptions, source: str) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    columns = set(table.column_names)
    rows = table.to_pylist()
    probe = {name: True for name in columns}
    fmt = _json_object_format(probe) if ("instruction" not in columns or "output" in columns) else None
    if fmt:
        for index, row in enumerate(rows, start=1):
            yield record_from_object(row, fmt, source, index)
        return
    question = _pick_column(list(columns), options.question_columns)
    answer = _pick_column(list(columns), options.answer_columns)
    if question is None or answer is None:
        raise InputError(f"{path}: parquet columns {sorted(columns)} hold no messages/conversations/question-answer")
    category = _pick_column(list(columns), [options.category_column])
    for index, row in enumerate(rows, start=1):
        meta = {"category": row[category]} if category and row.get(category) else {}
        messages = [{"role": "user", "content": row.get(question)}, {"role": "assistant", "content": row.get(answer)}]
        yield make_record(messages, source, index, meta=meta)

