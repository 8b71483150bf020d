"""Small, learnable chat data for training tests: patterned questions with patterned answers.

Use it like this::

    write_chat_jsonl(tmp_path / "chats.jsonl", count=120)     # OpenAI chat JSONL
"""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = ["router", "invoice", "password", "modem", "account", "refund", "delivery", "upgrade"]
COLOURS = ["red", "blue", "green", "orange"]


def chat_pair(index: int) -> list[dict[str, str]]:
    topic = TOPICS[index % len(TOPICS)]
    colour = COLOURS[(index // len(TOPICS)) % len(COLOURS)]
    return [
        {"role": "user", "content": f"My {topic} light is {colour}. What should I do about ticket {index}?"},
        {"role": "assistant", "content": f"For a {colour} {topic} light, restart the {topic} and wait."},
    ]


def write_chat_jsonl(path: Path, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({"messages": chat_pair(index)}) + "\n")
    return path
