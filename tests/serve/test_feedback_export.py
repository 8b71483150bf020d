"""`chatforge feedback export`: rated conversations feed the next `prepare`; bad answers without a fix do not."""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.config import FitConfig, PrepareConfig
from chatforge.data.prepare import prepare
from chatforge.core.records import read_jsonl
from chatforge.serve.feedback import export_feedback
from chatforge.serve.store import Store

CORRECTION = "Here is the seed list for [EMAIL]: peas, beans, kale."  # as stored: redacted
QUESTION = [{"role": "system", "content": "You answer questions about the garden."}]


def conversation(question: str) -> list[dict[str, str]]:
    return QUESTION + [{"role": "user", "content": question}]


def rated_store(url: str) -> Store:
    """Four served conversations: liked, disliked and corrected, disliked only, and liked after a dislike."""
    store = Store(url)
    _, key = store.create_key("alice")
    store.store_conversation("chatcmpl-up", key.id, "tiny", conversation("When should I water the tomatoes?"),
                             "Early in the morning, at the roots.")
    store.store_conversation("chatcmpl-fixed", key.id, "tiny", conversation("Mail the seed list to jo@example.com"),
                             "I cannot send mail.")
    store.store_conversation("chatcmpl-down", key.id, "tiny", conversation("How deep do I plant garlic cloves?"),
                             "Garlic is a vegetable.")
    store.store_conversation("chatcmpl-changed", key.id, "tiny", conversation("Which roses like shade?"),
                             "Rambling roses such as Albéric Barbier cope with shade.")
    store.store_conversation("chatcmpl-unrated", key.id, "tiny", conversation("Is it going to rain?"), "Maybe.")
    store.add_feedback("chatcmpl-up", key.id, 1)
    store.add_feedback("chatcmpl-fixed", key.id, -1, correction=CORRECTION.replace("[EMAIL]", "jo@example.com"))
    store.add_feedback("chatcmpl-down", key.id, -1, comment="not an answer")
    store.add_feedback("chatcmpl-changed", key.id, -1)
    store.add_feedback("chatcmpl-changed", key.id, 1)  # the later rating replaces it
    return store


def test_export_keeps_liked_and_corrected_and_counts_the_rest(tmp_path: Path) -> None:
    with rated_store(f"sqlite:///{tmp_path / 'serve.db'}") as store:
        report = export_feedback(store, tmp_path / "out" / "feedback.jsonl")
    assert (report.exported_up, report.exported_corrected, report.skipped_down_without_correction,
            report.superseded) == (2, 1, 1, 0)  # one rating per completion and key: nothing superseded
    assert report.exported == 3 and report.path == tmp_path / "out" / "feedback.jsonl"
    records = {record["meta"]["completion_id"]: record for record in
               (json.loads(line) for line in report.path.read_text(encoding="utf-8").splitlines())}
    assert set(records) == {"chatcmpl-up", "chatcmpl-fixed", "chatcmpl-changed"}
    assert records["chatcmpl-up"] == {
        "messages": conversation("When should I water the tomatoes?")
        + [{"role": "assistant", "content": "Early in the morning, at the roots."}],
        "meta": {"source": "feedback", "completion_id": "chatcmpl-up", "rating": 1, "corrected": False}}
    fixed = records["chatcmpl-fixed"]
    assert fixed["messages"][-2:] == [{"role": "user", "content": "Mail the seed list to [EMAIL]"},
                                      {"role": "assistant", "content": CORRECTION}]
    assert fixed["meta"] == {"source": "feedback", "completion_id": "chatcmpl-fixed", "rating": -1, "corrected": True}
    assert "Albéric" in records["chatcmpl-changed"]["messages"][-1]["content"]  # UTF-8, not escaped away


def test_export_of_a_store_without_feedback_writes_an_empty_file(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'serve.db'}") as store:
        store.store_conversation("chatcmpl-1", None, "tiny", conversation("Hello?"), "Hi.")
        report = export_feedback(store, tmp_path / "feedback.jsonl")
    assert (report.exported, report.skipped_down_without_correction, report.superseded) == (0, 0, 0)
    assert report.path.read_text() == ""


def test_prepare_accepts_the_export_with_the_correction_as_the_answer(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with rated_store(f"sqlite:///{tmp_path / 'serve.db'}") as store:
        report = export_feedback(store, tmp_path / "feedback.jsonl")
    prepared = prepare([report.path], tmp_path / "ds",
                       PrepareConfig(fit=FitConfig(model=str(tiny_tokenizer_dir), max_tokens=128), workers=1))
    assert prepared.counts["read"] == 3 and prepared.counts["invalid"] == 0 and prepared.counts["kept"] == 3
    kept = [record for split in ("train", "val", "test") for record in read_jsonl(tmp_path / "ds" / f"{split}.jsonl")]
    answers = {record["meta"]["completion_id"]: record["messages"][-1] for record in kept}
    assert answers["chatcmpl-fixed"] == {"role": "assistant", "content": CORRECTION}
    assert answers["chatcmpl-up"]["content"] == "Early in the morning, at the roots."
    assert all(record["meta"]["corrected"] == (record["meta"]["rating"] == -1) for record in kept)
