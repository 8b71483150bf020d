"""Augmentation makes marked, seeded, noisy copies of user turns and never touches what must stay exact."""

from __future__ import annotations

import copy
import random
import re

from chatforge.config import AugmentConfig
from chatforge.data.augment import add_typo, augment_records, augment_text, load_synonyms, match_case
from chatforge.core.records import Record, make_record

NOISY = AugmentConfig(typo_rate=0.3, swap_rate=0.2, synonym_rate=0.5)


def support_records(count: int = 5) -> list[Record]:
    records = []
    for i in range(count):
        messages = [
            {"role": "system", "content": "You are a helpful support agent for the quick shop."},
            {"role": "user", "content": f"Hello, my package is very late and I need a quick refund please ({i})"},
            {"role": "assistant", "content": "Sorry about the delay, I will check the delivery status right away."},
        ]
        records.append(make_record(messages, source="tickets.jsonl", line=i + 1, meta={"category": "shipping"}))
    return records


def test_each_record_gives_copies_marked_with_their_origin() -> None:
    records = support_records(4)
    copies = augment_records(records, AugmentConfig(copies=3))
    assert len(copies) == 3 * len(records)
    assert [c["id"] for c in copies[:3]] == [f"{records[0]['id']}-aug{k}" for k in (1, 2, 3)]
    for augmented, original in zip(copies, [r for r in records for _ in range(3)]):
        assert augmented["meta"]["augmented"] is True
        assert augmented["meta"]["augmented_from"] == original["id"]
        assert augmented["meta"]["source"] == original["meta"]["source"]
        assert augmented["meta"]["category"] == "shipping"


def test_originals_are_not_changed_and_copies_share_nothing_with_them() -> None:
    records = support_records(3)
    snapshot = copy.deepcopy(records)
    copies = augment_records(records, NOISY)
    assert records == snapshot
    copies[0]["meta"]["category"] = "edited"
    copies[0]["messages"][0]["content"] = "edited"
    assert records == snapshot


def test_same_seed_gives_same_copies_and_another_seed_differs() -> None:
    records = support_records(5)
    first = augment_records(records, NOISY)
    assert augment_records(records, NOISY) == first
    assert augment_records(list(reversed(records)), NOISY) == [
        c for r in reversed(records) for c in first if c["meta"]["augmented_from"] == r["id"]
    ]
    assert augment_records(records, NOISY.model_copy(update={"seed": 1})) != first


def test_user_turns_change_but_assistant_and_system_stay_by_default() -> None:
    records = support_records(5)
    copies = augment_records(records, AugmentConfig())  # default, low rates
    for augmented, original in zip(copies, records):
        assert augmented["messages"][0] == original["messages"][0]
        assert augmented["messages"][2] == original["messages"][2]
        assert augmented["messages"][1]["content"] != original["messages"][1]["content"]


def test_assistant_turns_change_when_their_role_is_listed() -> None:
    records = support_records(3)
    copies = augment_records(records, NOISY.model_copy(update={"roles": ["assistant"]}))
    for augmented, original in zip(copies, records):
        assert augmented["messages"][1] == original["messages"][1]
        assert augmented["messages"][2]["content"] != original["messages"][2]["content"]


def test_placeholders_urls_and_numbers_are_never_touched() -> None:
    protected = ["[EMAIL]", "[PHONE]", "[CREDIT_CARD]", "https://shop.example/orders/A17", "12345", "3pm", "me@x.io"]
    text = "please write back quickly to [EMAIL] about order 12345 before 3pm, see https://shop.example/orders/A17 " \
           "or [PHONE] or [CREDIT_CARD] or me@x.io"
    everything = AugmentConfig(typo_rate=1.0, swap_rate=1.0, synonym_rate=1.0)
    for seed in range(20):
        noisy = augment_text(text, everything, random.Random(seed))
        assert noisy != text
        for token in protected:
            assert token in noisy.split() or token + "," in noisy.split()


def test_typos_only_hit_words_of_four_letters_or_more() -> None:
    text = "I am so ok to go by car"
    assert augment_text(text, AugmentConfig(typo_rate=1.0, swap_rate=0, synonym_rate=0), random.Random(0)) == text


def test_add_typo_keeps_the_first_letter_and_always_changes_the_word() -> None:
    rng = random.Random(0)
    for _ in range(200):
        typo = add_typo("Keyboard", rng)
        assert typo != "Keyboard" and typo[0] == "K" and abs(len(typo) - len("Keyboard")) <= 1


def test_synonyms_keep_the_original_capitalisation() -> None:
    assert match_case("fast", "Quick") == "Fast"
    assert match_case("fast", "QUICK") == "FAST"
    assert match_case("fast", "quick") == "fast"
    only_synonyms = AugmentConfig(typo_rate=0, swap_rate=0, synonym_rate=1.0)
    noisy = augment_text("Quick QUICK quick", only_synonyms, random.Random(0))
    first, second, third = noisy.split()
    assert first[0].isupper() and first[1:].islower() and second.isupper() and third.islower()
    assert {w.lower() for w in noisy.split()} <= set(load_synonyms()["quick"])


def test_bundled_synonyms_are_symmetric_lowercase_words() -> None:
    synonyms = load_synonyms()
    assert len(synonyms) > 300
    for word, others in synonyms.items():
        assert word == word.lower() and re.fullmatch(r"[a-z'-]+", word)
        assert word not in others
        assert all(word in synonyms[other] for other in others if " " not in other)


def test_a_copy_that_cannot_change_is_still_returned() -> None:
    record = make_record([{"role": "user", "content": "[EMAIL] 42"}, {"role": "assistant", "content": "ok"}], "a", 1)
    copies = augment_records([record], AugmentConfig(copies=2))
    assert [c["messages"] for c in copies] == [record["messages"]] * 2
    assert [c["id"] for c in copies] == [f"{record['id']}-aug1", f"{record['id']}-aug2"]
