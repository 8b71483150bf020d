"""The demo's Lumo FAQ: generated deterministically, and split so that the test set asks trained questions in
phrasings the model has not seen (each question's other phrasings train)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from chatforge.config import FitConfig, PrepareConfig
from chatforge.data.prepare import prepare
from chatforge.demo import FAQ_FILE, demo_inputs
from chatforge.resources.make_lumo_faq import faq_records


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_committed_faq_is_what_the_generator_writes() -> None:
    written = read(FAQ_FILE)
    assert written == faq_records()
    assert len(written) >= 200 and len({r["meta"]["category"] for r in written}) * 5 == len(written)
    assert demo_inputs()[0] == FAQ_FILE


def test_held_out_phrasings_are_new_words_for_trained_questions(tmp_path: Path) -> None:
    prepare([FAQ_FILE], tmp_path / "ds", PrepareConfig(fit=FitConfig(enabled=False)), log=lambda _m: None)
    train, test = read(tmp_path / "ds" / "train.jsonl"), read(tmp_path / "ds" / "test.jsonl")
    assert len(test) >= 20
    trained_per_question = Counter(r["meta"]["category"] for r in train)
    train_questions = {r["messages"][0]["content"] for r in train}
    train_answers = {r["messages"][1]["content"] for r in train}
    for record in test:
        assert record["messages"][0]["content"] not in train_questions      # an unseen phrasing...
        assert record["messages"][1]["content"] in train_answers            # ...of a question whose answer trained
        assert trained_per_question[record["meta"]["category"]] >= 3
    assert max(Counter(r["meta"]["category"] for r in test).values()) == 1  # one held-out phrasing per question
