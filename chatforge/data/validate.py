"""Check that a record is a conversation a chat model can be trained on.

Use it like this::

    reason = validate_messages(record["messages"])   # None when valid, else e.g. "message 2 has role 'bot'; ..."
    record, trimmed, reason = check_record(record, cfg.prepare.validate)   # what prepare does: trims, then validates

Rules: known roles only; every content a non-empty string; a system message only first; then user and assistant
alternate, starting with user; the last message is the assistant's (switch off with require_assistant_last=False).
Real chat logs often end with the customer's "thanks, bye": with `trailing_user: trim` (the default) the user (and
system) turns after the last assistant turn are cut off and the rest is kept; a conversation with no assistant turn
is rejected either way. A record larger than `max_record_bytes` is rejected before anything else looks at it.
"""

from __future__ import annotations

import json
from typing import Any

from chatforge.config import ValidateConfig
from chatforge.core.records import ROLES, Record

TRIMMABLE_ROLES = ("user", "system")  # a trailing turn with an unknown role is an error to report, not to trim
NO_ASSISTANT_LAST = "conversation does not end with an assistant message"


def validate_messages(messages: Any, require_assistant_last: bool = True) -> str | None:
    """Return why `messages` is not a valid conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    expected = "user"
    for position, message in enumerate(messages, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            return f"message {position} has role {role!r}; expected system, user or assistant"
        content = message.get("content")
        if not isinstance(content, str):
            return f"message {position} ({role}) content is {type(content).__name__}, expected text"
        if not content.strip():
            return f"message {position} ({role}) is empty"
        if role == "system":
            if position != 1:
                return f"message {position} is a system message; only the first message may be one"
            continue
        if role != expected:
            return f"message {position} is {role} but {expected} was expected (turns must alternate user/assistant)"
        expected = "assistant" if role == "user" else "user"
    if expected == "user" and messages[-1].get("role") == "system":
        return "only a system message"
    if require_assistant_last and messages[-1].get("role") != "assistant":
        return NO_ASSISTANT_LAST
    return None


def trim_trailing_turns(messages: Any) -> tuple[Any, int]:
    """`trim_trailing_turns([user, assistant, user])` -> ([user, assistant], 1): user/system turns after the last
    assistant turn go. Messages without an assistant turn come back unchanged (nothing to end on)."""
    if not isinstance(messages, list):
        return messages, 0
    end = len(messages)
    while end > 0 and isinstance(messages[end - 1], dict) and messages[end - 1].get("role") in TRIMMABLE_ROLES:
        end -= 1
    if end == 0 or end == len(messages) or not isinstance(messages[end - 1], dict):
        return messages, 0
    return messages[:end], len(messages) - end


def record_size(record: Record) -> int:
    """UTF-8 bytes of a record's texts and meta: what `max_record_bytes` limits (cheap unless close to a limit)."""
    contents = [m.get("content") for m in record["messages"] if isinstance(m, dict)]
    size = sum(len(c) for c in contents if isinstance(c, str))
    meta = record.get("meta")
    if isinstance(meta, dict) and len(meta) > 1:  # more than the source
        size += len(json.dumps(meta, ensure_ascii=False, default=str))
    return size


def size_problem(record: Record, max_bytes: int) -> str | None:
    """Why a record is too large to keep, or None. Characters are counted first; bytes only when they could matter."""
    size = record_size(record)
    if size * 4 > max_bytes:  # a character is at most 4 UTF-8 bytes
        size = len(json.dumps({"messages": record["messages"], "meta": record.get("meta")}, ensure_ascii=False,
                              default=str).encode("utf-8", "replace"))
    if size > max_bytes:
        return f"record is {size:,} bytes, over validate.max_record_bytes {max_bytes:,} (content not written)"
    return None


def check_record(record: Record, cfg: ValidateConfig, require_assistant_last: bool = True) -> tuple[Record, int, str | None]:
    """Trim trailing user turns (if configured) and validate: (record to keep, turns trimmed, reason or None).

    A trimmed record gets meta.trimmed_turns; a rejected one comes back as it was read.
    """
    messages, trimmed = record["messages"], 0
    if require_assistant_last and cfg.trailing_user == "trim":
        messages, trimmed = trim_trailing_turns(messages)
    reason = validate_messages(messages, require_assistant_last)
    if reason:
        if reason == NO_ASSISTANT_LAST and cfg.trailing_user == "trim":
            reason = "no assistant turn to end on (a conversation needs at least one answer)"
        return record, 0, reason
    if trimmed:
        record = {**record, "messages": messages, "meta": {**record["meta"], "trimmed_turns": trimmed}}
    return record, trimmed, None
