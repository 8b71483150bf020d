"""Pass every string `prepare` writes through the redactor: values, nested values, keys, raw lines, file names, logs.

Use it like this::

    scrub = Scrubber(Redactor.from_config(cfg.pii))      # Scrubber(None) redacts nothing but still makes JSON-safe
    meta = scrub.tree(record["meta"])                      # nested values and keys, e.g. {"[EMAIL]": "[PHONE]"}
    line = scrub.raw_line('{"a": "jane\\u0040example.com"')  # JSON escapes undone first: '{"a": "[EMAIL]"'
    scrub.counts                                           # Counter of what was replaced, by type

The rule (README, prepare): every string that prepare writes to any file (all JSONL files, card, manifest, logs)
passes the redactor, or is not written. `tree` also turns what JSON cannot hold (bytes, dates, numpy scalars, lone
surrogates) into text, so writing can never fail halfway on a value read from an input.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from chatforge.core.pii import Redactor
from chatforge.data.formats import MAX_JSON_DEPTH

Log = Callable[[str], None]

# A JSON string escape: a surrogate pair, one \uXXXX, or a one-letter escape.
_JSON_ESCAPE = re.compile(r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|\\u([0-9a-fA-F]{4})|\\([\"\\/bfnrt])")
_ONE_LETTER_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def json_unescape(text: str) -> str:
    """Undo JSON string escapes in a (maybe malformed) JSON line, one pass: 'a\\u0040b.io' -> 'a@b.io'."""
    return _JSON_ESCAPE.sub(_unescape_one, text) if "\\" in text else text


def _unescape_one(match: re.Match[str]) -> str:
    high, low, single, letter = match.groups()
    if high:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    if single:
        code = int(single, 16)
        return "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)  # a lone surrogate cannot be written as UTF-8
    return _ONE_LETTER_ESCAPES[letter]


def _writable(text: str) -> str:
    """The text with lone surrogates (from a '\\ud800' escape) replaced, so it can be written as UTF-8."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


class Scrubber:
    """Redacts strings and whole JSON-like trees with one Redactor and counts what it replaced (see module doc)."""

    def __init__(self, redactor: Redactor | None) -> None:
        self.redactor = redactor
        self.counts: Counter[str] = Counter()

    def text(self, text: str) -> str:
        """One string, redacted."""
        text = _writable(text)
        if self.redactor is None:
            return text
        redacted, found = self.redactor.redact(text)
        if found:
            self.counts.update(found)
        return redacted

    def tree(self, value: Any, depth: int = 0) -> Any:
        """A JSON-like value with every string redacted, keys included; other types made JSON-safe."""
        if isinstance(value, str):
            return self.text(value)
        if value is None or isinstance(value, (bool, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if depth >= MAX_JSON_DEPTH:
            return f"[nested deeper than {MAX_JSON_DEPTH} levels]"
        if isinstance(value, dict):
            scrubbed: dict[str, Any] = {}
            repeats: Counter[str] = Counter()  # two keys redacted alike ('[EMAIL]') must not overwrite each other
            for key, item in value.items():
                name = self.text(key if isinstance(key, str) else str(key))
                while name in scrubbed:  # '[EMAIL]', '[EMAIL] #2', ...: one lookup per key, not one per earlier twin
                    repeats[name] += 1
                    name = f"{name} #{repeats[name] + 1}"
                scrubbed[name] = self.tree(item, depth + 1)
            return scrubbed
        if isinstance(value, (list, tuple)):
            return [self.tree(item, depth + 1) for item in value]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"[{len(value)} bytes]"
        return self.text(str(value))  # dates, decimals, numpy scalars, ...

    def raw_line(self, line: str) -> str:
        """A raw input line that could not be parsed, JSON escapes undone, then redacted."""
        return self.text(json_unescape(line))

    def source(self, source: str) -> str:
        """'path:line' with the path redacted and the line number kept as it is."""
        path, sep, line = source.rpartition(":")
        return f"{self.text(path)}{sep}{line}" if sep and line.isdigit() else self.text(source)

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record's meta (source kept as 'path:line') and any extra top-level fields redacted; messages are not
        touched here (the clean-and-redact step does them, and counts them)."""
        meta = dict(record.get("meta") or {})
        source = meta.pop("source", None)
        scrubbed_meta = self.tree(meta)
        if isinstance(source, str):
            scrubbed_meta["source"] = self.source(source)
        extra = {k: self.tree(v) for k, v in record.items() if k not in ("id", "messages", "meta", "weight")}
        return {**record, **extra, "meta": scrubbed_meta}

    def log(self, log: Log) -> Log:
        """`log` with every line redacted first."""
        return lambda message: log(self.text(message))
