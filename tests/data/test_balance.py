"""Balancing caps or upsamples categories to the target, reports why, and keeps every record accounted for."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from chatforge.config import BalanceConfig
from chatforge.data.balance import NO_CATEGORY, balance_records, categorise
from chatforge.core.records import Record


def make_records(counts: dict[str | None, int], user_text: str = "question") -> list[Record]:
    """Records interleaved across categories ({"billing": 3, None: 1} -> billing, (none), billing, billing)."""
    pending = {category: count for category, count in counts.items()}
    records: list[Record] = []
    while any(pending.values()):
        for category in list(pending):
            if pending[category]:
                pending[category] -= 1
                meta: dict[str, Any] = {"source": f"in.jsonl:{len(records) + 1}"}
                if category is not None:
                    meta["category"] = category
                messages = [{"role": "user", "content": f"{user_text} {len(records)}"},
                            {"role": "assistant", "content": "answer"}]
                records.append({"id": f"r{len(records):04d}", "messages": messages, "meta": meta})
    return records


def categories_of(records: list[Record]) -> Counter[str]:
    return Counter(r["meta"].get("category", NO_CATEGORY) for r in records)


def assert_accounted_for(records: list[Record], result: Any) -> None:
    ids_out = [r["id"] for r in result.kept] + [r["id"] for r, _ in result.removed]
    assert sorted(ids_out) == sorted(r["id"] for r in records)
    assert sum(result.before.values()) == len(records)
    assert sum(result.after.values()) == len(result.kept) + len(result.added)


def test_cap_to_uniform_cuts_every_category_to_the_smallest() -> None:
    records = make_records({"billing": 30, "shipping": 12, "returns": 10})
    result = balance_records(records, BalanceConfig(mode="cap"))
    assert result.before == {"billing": 30, "returns": 10, "shipping": 12}
    assert result.after == {"billing": 10, "returns": 10, "shipping": 10}
    assert categories_of(result.kept) == {"billing": 10, "shipping": 10, "returns": 10}
    assert result.added == [] and result.skipped_reason is None
    assert {reason for _, reason in result.removed} == {
        "balance: category 'billing' capped at 10 of 30",
        "balance: category 'shipping' capped at 10 of 12",
    }
    assert_accounted_for(records, result)


def test_cap_keeps_input_order_and_is_seeded() -> None:
    records = make_records({"billing": 30, "shipping": 10})
    first = balance_records(records, BalanceConfig())
    order = {r["id"]: i for i, r in enumerate(records)}
    assert [order[r["id"]] for r in first.kept] == sorted(order[r["id"]] for r in first.kept)
    assert balance_records(records, BalanceConfig()).kept == first.kept
    assert balance_records(records, BalanceConfig(seed=1)).kept != first.kept


def test_cap_to_fractions_keeps_the_largest_total_that_fits() -> None:
    records = make_records({"billing": 50, "shipping": 50, "returns": 10})
    result = balance_records(records, BalanceConfig(target={"billing": 2, "shipping": 1}))
    # billing:shipping = 2:1 with at most 50 billing -> 50 + 25; returns is not in the target, so it is left alone
    assert result.after == {"billing": 50, "returns": 10, "shipping": 25}
    assert_accounted_for(records, result)


def test_upsample_to_uniform_adds_copies_that_cycle_through_originals() -> None:
    records = make_records({"billing": 10, "shipping": 4})
    result = balance_records(records, BalanceConfig(mode="upsample"))
    assert result.kept == records and result.removed == []
    assert result.after == {"billing": 10, "shipping": 10}
    assert len(result.added) == 6
    sources = Counter(copy["meta"]["upsampled_from"] for copy in result.added)
    assert sorted(sources.values()) == [1, 1, 2, 2]  # all four originals copied once before any twice
    by_id = {r["id"]: r for r in records}
    for copy in result.added:
        original = by_id[copy["meta"]["upsampled_from"]]
        assert copy["id"] in {f"{original['id']}-up1", f"{original['id']}-up2"}
        assert copy["messages"] == original["messages"] and copy["meta"]["category"] == "shipping"
    assert len({copy["id"] for copy in result.added}) == 6


def test_mode_argument_overrides_the_configured_mode() -> None:
    records = make_records({"billing": 6, "shipping": 3})
    result = balance_records(records, BalanceConfig(mode="cap"), mode="upsample")
    assert result.removed == [] and len(result.added) == 3
    with pytest.raises(ValueError, match="balance mode 'shuffle'"):
        balance_records(records, BalanceConfig(), mode="shuffle")


def test_keyword_rules_assign_categories_and_write_them_into_meta() -> None:
    rules = {"billing": ["invoice", "refund"], "shipping": ["parcel", "tracking number"]}
    cfg = BalanceConfig(keyword_rules=rules)
    refund = {"id": "a", "messages": [{"role": "user", "content": "Where is my REFUND?"}], "meta": {}}
    parcel = {"id": "b", "messages": [{"role": "user", "content": "my tracking number is wrong"}], "meta": {}}
    partial = {"id": "c", "messages": [{"role": "user", "content": "refunding parcels"}], "meta": {}}
    assistant_only = {"id": "d", "messages": [{"role": "assistant", "content": "your invoice"}], "meta": {}}
    labelled = {"id": "e", "messages": [{"role": "user", "content": "invoice"}], "meta": {"category": "other"}}
    assert [categorise(r, cfg) for r in (refund, parcel, partial, assistant_only, labelled)] == [
        "billing", "shipping", None, None, "other",
    ]
    result = balance_records([refund, parcel, partial], cfg, mode="upsample")
    assert [r["meta"].get("category") for r in result.kept] == ["billing", "shipping", None]
    assert refund["meta"] == {}  # the input record itself is not changed


def test_records_without_a_category_are_never_capped_or_copied() -> None:
    records = make_records({"billing": 20, "shipping": 5, None: 7})
    capped = balance_records(records, BalanceConfig())
    assert capped.before[NO_CATEGORY] == capped.after[NO_CATEGORY] == 7
    assert all(r["meta"].get("category") for r, _ in capped.removed)
    upsampled = balance_records(records, BalanceConfig(), mode="upsample")
    assert upsampled.after == {"billing": 20, "shipping": 20, NO_CATEGORY: 7}
    assert all(r["meta"].get("category") for r in upsampled.added)


def test_nothing_is_done_when_no_record_has_a_category() -> None:
    records = make_records({None: 5})
    result = balance_records(records, BalanceConfig())
    assert result.kept == records and result.removed == [] and result.added == []
    assert result.before == result.after == {NO_CATEGORY: 5}
    assert result.skipped_reason is not None and "no record has a category" in result.skipped_reason


def test_balanced_data_is_left_alone_with_a_reason() -> None:
    records = make_records({"billing": 4, "shipping": 4})
    result = balance_records(records, BalanceConfig())
    assert result.kept == records and result.skipped_reason == "categories already match the target"


def test_negative_target_fractions_are_an_error() -> None:
    records = make_records({"billing": 4, "shipping": 2})
    with pytest.raises(ValueError, match="non-negative"):
        balance_records(records, BalanceConfig(target={"billing": -1.0, "shipping": 1.0}))
