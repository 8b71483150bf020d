"""Check that a record is a conversation a chat model can be trained on.

Use it like this::

    reason = validate_messages(record["messages"])   # None when valid, else e.g. "message 2 has role 'bot'; ..."

Rules: known roles only; every content a non-empty string; a system message only first; then user and assistant
alternate, starting with user; the last message is the assistant's (switch off with require_assistant_last=False).
"""

from __future__ import annotations

from typing import Any

from chatforge.data.records import ROLES


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
        return "conversation does not end with an assistant message"
    return None
