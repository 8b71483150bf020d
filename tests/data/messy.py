"""A messy multi-format input folder with planted PII, duplicates and broken records, for the prepare tests.

Use it like this::

    planted = write_messy_inputs(tmp_path / "in")    # returns the PII values planted, to scan outputs for
"""

from __future__ import annotations

import json
from pathlib import Path

PLANTED_PII = {
    "EMAIL": "jane.doe@example.com",
    "PHONE": "+44 20 7946 0958",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "IBAN": "GB82 WEST 1234 5698 7654 32",
    "IP_ADDRESS": "192.168.10.77",
    "SSN": "123-45-6789",
    "API_KEY": "sk-proj-Zk3mQ9vX2pL7rT4wY8nB1cF6hJ0dS5aG",
    "URL_CREDENTIALS": "admin:hunter2secret",
}

LONG_ANSWER = (
    "To reset your router first unplug it from the wall and wait thirty seconds before plugging it back in. "
    "Then hold the small reset button on the back for ten seconds until the lights blink. After that connect "
    "to the default network printed on the label and open the setup page in your browser. Choose a new admin "
    "password and a new network name, save the settings and wait for the router to restart. If the lights stay "
    "red call our support line and quote the serial number from the label so we can check the line from our side. "
    "Most problems are solved by this procedure and you will not need a technician visit at all in most cases."
)


def _chat(user: str, assistant: str, **extra: object) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                       **extra})


def write_messy_inputs(folder: Path) -> dict[str, str]:
    """Write chats.jsonl, faq.csv, log.txt and smalltalk.yml into `folder`; returns the planted PII by type."""
    folder.mkdir(parents=True, exist_ok=True)
    pii = PLANTED_PII
    lines = [
        _chat(f"My email is {pii['EMAIL']}, call me at {pii['PHONE']}", "Thanks, we will reach out."),
        _chat(f"Charge card {pii['CREDIT_CARD']} please", "Done &amp; <b>confirmed</b>!!!!!!"),
        _chat(f"Wire it to {pii['IBAN']}", "The transfer is on its way."),
        _chat(f"My server {pii['IP_ADDRESS']} is down", "We restarted it."),
        _chat(f"SSN {pii['SSN']} for the form", "Noted."),
        _chat(f"here is my key {pii['API_KEY']}", "Never share keys; please rotate it."),
        _chat(f"db is postgres://{pii['URL_CREDENTIALS']}@db.example.com/prod", "Connection string received."),
        "{\"messages\": [broken json",
        json.dumps({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        _chat("How do I reset my router?", LONG_ANSWER),
        _chat("How do I reset my router?", LONG_ANSWER),  # exact duplicate
        _chat("how do i reset my router", LONG_ANSWER.replace("thirty seconds", "30 seconds")),  # near duplicate
        _chat("<br>", "An answer to nothing."),  # empty after cleaning
    ]
    lines += [_chat(f"Question number {i} about plan {i * 7}?", f"Answer {i}: plan {i * 7} costs {i} euros.")
              for i in range(30)]
    (folder / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    csv_rows = ["question,answer,category"]
    csv_rows += [f"How do I pay invoice {i}?,Pay invoice {i} in the billing tab.,billing" for i in range(12)]
    csv_rows += [f"Is outage {i} fixed?,Outage {i} was fixed this morning.,outage" for i in range(8)]
    csv_rows.append(f"Contact?,Write to {pii['EMAIL']},billing")
    (folder / "faq.csv").write_text("\n".join(csv_rows) + "\n", encoding="utf-8")
    (folder / "log.txt").write_text(
        "User: my modem blinks\nAgent: which colour?\nUser: orange\nAgent: that means no signal\n\n"
        "User: thanks\n\nstray line without a label\n",
        encoding="utf-8",
    )
    (folder / "smalltalk.yml").write_text(
        "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there!\n- - How are you?\n  - Fine, thanks.\n",
        encoding="utf-8",
    )
    return dict(pii)
