"""`chatforge feedback export`: rated conversations from the serve store, as chat JSONL for the next `prepare`.

Use it like this::

    report = export_feedback(Store("sqlite:///chatforge.db"), Path("feedback.jsonl"))
    # FeedbackExport(exported_up=12, exported_corrected=3, skipped_down_without_correction=5, superseded=1, ...)
    # then: chatforge prepare data/ feedback.jsonl --out data/prepared-v2

What goes out, one OpenAI chat record per rated conversation:
- rated +1: the stored messages and the model's answer as the last assistant turn;
- rated -1 with a corrected answer: the stored messages and the correction as the assistant turn;
- rated -1 without a correction: skipped (we know the answer was bad, not what a good one is), and counted.
A key holds one rating per completion (rating again replaces it); where a conversation has several rating rows
(databases from before that rule), its latest decides and the earlier ones count as superseded.
Every record carries meta {"source": "feedback", "completion_id", "rating", "corrected"}; `prepare` replaces
"source" with file:line and keeps the rest. Everything stored is PII-redacted already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.serve.store import Store


@dataclass(frozen=True)
class FeedbackExport:
    """How many feedback rows went where: exported_up + exported_corrected + skipped + superseded = rows read."""

    exported_up: int
    exported_corrected: int
    skipped_down_without_correction: int
    path: Path
    superseded: int = 0

    @property
    def exported(self) -> int:
        return self.exported_up + self.exported_corrected


def export_feedback(store: Store, out: Path) -> FeedbackExport:
    """Write the rated conversations of `store` to `out` (JSONL, UTF-8) and say how many went where."""
    rows = store.feedback_rows()
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:  # oldest first, so the last one seen per completion is its latest
        latest[row["completion_id"]] = row
    records, up, corrected, skipped = [], 0, 0, 0
    for row in latest.values():
        if row["rating"] > 0:
            answer, up = row["answer"], up + 1
        elif row["correction"]:
            answer, corrected = row["correction"], corrected + 1
        else:
            skipped += 1
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        records.append({"messages": messages + [{"role": "assistant", "content": answer}],
                        "meta": {"source": "feedback", "completion_id": row["completion_id"],
                                 "rating": row["rating"], "corrected": row["rating"] < 0}})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return FeedbackExport(exported_up=up, exported_corrected=corrected, skipped_down_without_correction=skipped,
                          path=out, superseded=len(rows) - len(latest))
