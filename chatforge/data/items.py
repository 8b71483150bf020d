"""What the readers produce: records from parsed objects, rejections of single items, errors about whole files.

Use it like this (as the readers in `formats` and `tables` do)::

    item = record_from_object({"messages": [...]}, "openai", source="chats.jsonl", line=3)
    if isinstance(item, Rejection): ...          # item.reason says what is missing
    raise InputError("chats.jsonl:3: ...")       # a whole file cannot be read: one line naming it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatforge.core.records import Message, Record, make_record

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


def json_object_format(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


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


def pick_column(header: list[str], candidates: list[str]) -> str | None:
    lowered = {name.strip().lower(): name for name in header}
    for candidate in candidates:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None
