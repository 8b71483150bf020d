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

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from chatforge.config import FormatOptions
from chatforge.core.records import Message, make_record
from chatforge.data.items import InputError, Item, Rejection, json_object_format, record_from_object
from chatforge.data.tables import read_parquet, read_table

FORMATS = ("openai", "sharegpt", "alpaca", "csv", "tsv", "chatterbot", "transcript", "parquet")
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
KNOWN_SUFFIXES = JSON_SUFFIXES | {".csv", ".tsv", ".yml", ".yaml", ".txt", ".parquet"}
MAX_JSON_DEPTH = 100  # real records nest ~5 deep; Python's own parser would give up near 1,000 with a RecursionError
DEFAULT_MAX_RECORD_BYTES = 1_000_000
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
        fmt = json_object_format(first)
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
        yield from read_table(path, delimiter, options, source, max_record_bytes)
    elif fmt == "chatterbot":
        yield from _read_chatterbot(path, source)
    elif fmt == "transcript":
        yield from _read_transcript(path, options, source)
    elif fmt == "parquet":
        yield from read_parquet(path, options, source)
    else:
        raise InputError(f"{path}: unknown format '{fmt}' (known: {', '.join(FORMATS)})")


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
    if "\\ud" in line or "\\uD" in line:  # maybe a lone surrogate escape: UTF-8 (files, tokenizers) cannot hold one
        obj = without_lone_surrogates(obj)
    return obj, None


def without_lone_surrogates(value: Any) -> Any:
    """`value` with lone surrogates in its strings (and keys) replaced by U+FFFD; nesting is already bounded."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    return value


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
    turns: list[tuple[str, list[str]]] = []  # role and lines; joined once at the end (+= would copy per line)
    start_line = 0
    unlabeled: tuple[int, str] | None = None

    def flush() -> Iterator[Item]:
        nonlocal turns, unlabeled
        if unlabeled is not None:
            yield Rejection(source, unlabeled[0], f"line does not start with a speaker label ({', '.join(labels)})",
                            unlabeled[1])
        elif turns:
            messages: list[Message] = [{"role": role, "content": "\n".join(lines)} for role, lines in turns]
            yield make_record(messages, source, start_line)
        turns, unlabeled = [], None

    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = raw_line.rstrip("\n")
            if not line.strip():
                yield from flush()
                continue
            label, sep, rest = line.partition(":")
            role = labels.get(label.strip().lower()) if sep else None
            if not turns and unlabeled is None:
                start_line = line_number
            if role:
                turns.append((role, [rest.strip()]))
            elif turns:  # a continuation of the previous message
                turns[-1][1].append(line.strip())
            elif unlabeled is None:
                unlabeled = (line_number, line)
        yield from flush()


