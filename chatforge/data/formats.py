"""Read conversations from the formats people actually have, each into OpenAI chat records.

Use it like this::

    fmt = detect_format(path)                        # "openai", "sharegpt", "alpaca", "csv", "chatterbot", ...
    for item in read_file(path, fmt, FormatOptions()):
        if isinstance(item, Rejection): ...          # a line that could not be turned into a record, with reason
        else: ...                                    # a record dict (see records.make_record)

Problems with a whole file (missing, empty, binary, unknown format) raise `InputError` with a one-line message that
names the file; problems with one line/row/conversation become a `Rejection` so nothing is dropped silently.

Limits, so one hostile file can neither exhaust memory nor crash the run: a JSONL line over `max_record_bytes` is
rejected unparsed; JSON nested deeper than MAX_JSON_DEPTH is rejected (a whole JSON array file that deep is an
error); a CSV field over `max_record_bytes` is an error naming its line; YAML aliases (`*name`, the "billion laughs"
bomb) are refused; a parquet column prepare reads must hold text, numbers or lists/structs of them, not bytes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chatforge.config import FormatOptions
from chatforge.data.records import Message, Record, make_record

FORMATS = ("openai", "sharegpt", "alpaca", "csv", "tsv", "chatterbot", "transcript", "parquet")
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
KNOWN_SUFFIXES = JSON_SUFFIXES | {".csv", ".tsv", ".yml", ".yaml", ".txt", ".parquet"}
MAX_JSON_DEPTH = 100  # real records nest ~5 deep; Python's own parser would give up near 1,000 with a RecursionError
DEFAULT_MAX_RECORD_BYTES = 1_000_000
PARQUET_RECORD_COLUMNS = ("messages", "conversations", "meta", "weight", "system", "instruction", "input", "output")
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
        except (ValueError, IndexError, RecursionError):  # malformed or too deep: decide from the text below
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


def read_file(path: Path, fmt: str, options: FormatOptions,
              max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Item]:
    """Yield records and rejections from one file in the given format."""
    check_readable(path)
    source = str(path)
    if fmt in {"openai", "sharegpt", "alpaca"}:
        yield from _read_json_records(path, fmt, source, max_record_bytes)
    elif fmt in {"csv", "tsv"}:
        delimiter = "\t" if fmt == "tsv" or path.suffix.lower() == ".tsv" else ","
        yield from _read_table(path, delimiter, options, source, max_record_bytes)
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


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when lists/dicts nest more than `limit` levels (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _line_problem(line: str, max_bytes: int) -> str | None:
    size = len(line)
    if size * 4 > max_bytes:  # a character is at most 4 UTF-8 bytes: only then is the exact size worth computing
        size = len(line.encode("utf-8", "replace"))
    if size > max_bytes:
        return f"line is {size:,} bytes, over validate.max_record_bytes {max_bytes:,} (content not written)"
    return None


def _parse_json_line(line: str) -> tuple[Any, str | None]:
    """The parsed line, or why it could not be: malformed, or nested deeper than MAX_JSON_DEPTH."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    # nesting needs brackets: counting them (in C) spares the walk for every ordinary line
    if line.count("[") + line.count("{") > MAX_JSON_DEPTH and too_deep(obj):
        return None, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return obj, None


def _read_json_records(path: Path, fmt: str, source: str, max_record_bytes: int) -> Iterator[Item]:
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
            except RecursionError:
                raise InputError(f"{path}:1: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
            for index, obj in enumerate(objects, start=1):
                yield record_from_object(obj, fmt, source, index)
            return
        handle.seek(0)
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if problem := _line_problem(line, max_record_bytes):
                yield Rejection(source, line_number, problem, None)
                continue
            obj, problem = _parse_json_line(line)
            if problem:  # a malformed line is kept (redacted later) to be fixed; a bracket bomb is not
                yield Rejection(source, line_number, problem, None if "nested" in problem else line.rstrip("\n"))
                continue
            yield record_from_object(obj, fmt, source, line_number)


def _pick_column(header: list[str], candidates: list[str]) -> str | None:
    lowered = {name.strip().lower(): name for name in header}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field size limit (process-wide) set for one read, then restored."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_table(path: Path, delimiter: str, options: FormatOptions, source: str, max_record_bytes: int) -> Iterator[Item]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle, _csv_field_limit(max_record_bytes):
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            yield from _table_rows(reader, path, options, source)
        except csv.Error as exc:  # a field over the limit, a NUL byte, ...: the reader cannot go on past it
            line = reader.line_num + 1  # the line being read when it failed
            raise InputError(f"{path}:{line}: {exc} (the limit is validate.max_record_bytes)" if "field larger" in str(exc)
                             else f"{path}:{line}: not valid CSV: {exc}") from None


def _table_rows(reader: csv.DictReader, path: Path, options: FormatOptions, source: str) -> Iterator[Item]:
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


def _refuse_yaml_aliases(path: Path, text: str, loader: Any) -> None:
    """InputError at the first alias: expanding them is how a 500-byte 'billion laughs' file takes gigabytes."""
    if "*" not in text:
        return
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            raise InputError(f"{path}:{event.start_mark.line + 1}: YAML alias '*{event.anchor}' refused "
                             "(aliases can expand without bound); write the value out instead")


def _read_chatterbot(path: Path, source: str) -> Iterator[Item]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        _refuse_yaml_aliases(path, text, loader)
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(root, yaml.MappingNode):
        raise InputError(f"{path}: expected a mapping with a 'conversations:' list")
    sections = {key.value: value for key, value in root.value if isinstance(key, yaml.ScalarNode)}
    categories = sections.get("categories")
    category = None
    if isinstance(categories, yaml.SequenceNode) and categories.value and isinstance(categories.value[0], yaml.ScalarNode):
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
    import pyarrow.parquet as pq  # heavy, and only needed for parquet inputs

    try:
        columns = set(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    probe = {name: True for name in columns}
    fmt = _json_object_format(probe) if ("instruction" not in columns or "output" in columns) else None
    if fmt:
        wanted = [name for name in PARQUET_RECORD_COLUMNS if name in columns]
        for index, row in enumerate(_parquet_rows(path, wanted), start=1):
            yield record_from_object(row, fmt, source, index)
        return
    question = _pick_column(list(columns), options.question_columns)
    answer = _pick_column(list(columns), options.answer_columns)
    if question is None or answer is None:
        raise InputError(f"{path}: parquet columns {sorted(columns)} hold no messages/conversations/question-answer")
    category = _pick_column(list(columns), [options.category_column])
    wanted = [name for name in (question, answer, category) if name]
    for index, row in enumerate(_parquet_rows(path, wanted), start=1):
        meta = {"category": row[category]} if category and row.get(category) else {}
        messages = [{"role": "user", "content": row.get(question)}, {"role": "assistant", "content": row.get(answer)}]
        yield make_record(messages, source, index, meta=meta)


def _parquet_rows(path: Path, wanted: list[str]) -> list[dict[str, Any]]:
    """Rows of the columns prepare reads (others are never loaded); InputError for a column that holds bytes."""
    import pyarrow.parquet as pq  # heavy, and only needed for parquet inputs

    try:
        table = pq.read_table(path, columns=wanted)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    for name, column_type in zip(table.column_names, table.schema.types):
        if _holds_bytes(column_type):
            raise InputError(f"{path}: column '{name}' has type {column_type}; prepare reads text, numbers and "
                             "lists/structs of them (cast the column to string or drop it)")
    return table.to_pylist()


def _holds_bytes(arrow_type: Any) -> bool:
    """True for a binary type, or a list/struct/map/dictionary type with one inside."""
    import pyarrow as pa  # heavy, and only needed for parquet inputs

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or pa.types.is_fixed_size_binary(arrow_type):
        return True
    if pa.types.is_dictionary(arrow_type):
        return _holds_bytes(arrow_type.value_type)
    return any(_holds_bytes(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
