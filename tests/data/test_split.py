"""Splitting is seeded, keeps conversation pieces together, hits the ratios and keeps categories balanced."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from chatforge.config import SplitConfig
from chatforge.core.records import Record
from chatforge.data.split import split_counts, split_records


def make_records(count: int, categories: list[str] | None = None, pieces: int = 1) -> list[Record]:
    """`count` records; with `pieces` > 1, consecutive runs of that many share a meta.group (one conversation)."""
    records = []
    for i in range(count):
        meta: dict[str, Any] = {"source": f"in.jsonl:{i + 1}"}
        if categories:
            meta["category"] = categories[(i // pieces) % len(categories)]
        if pieces > 1:
            meta["group"] = f"conv-{i // pieces}"
        messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        records.append({"id": f"r{i:05d}", "messages": messages, "meta": meta})
    return records


def ids(records: list[Record]) -> list[str]:
    return [r["id"] for r in records]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 10, 11, 99, 1000])
@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (1, 1, 1)])
def test_split_sizes_are_within_one_of_the_ratios_and_add_up(count: int, ratios: tuple[float, ...]) -> None:
    cfg = SplitConfig(ratios=ratios)
    parts = split_records(make_records(count), cfg)
    assert sum(len(part) for part in parts) == count
    for part, ratio in zip(parts, cfg.ratios):
        assert abs(len(part) - ratio * count) < 1
        if ratio == 0:
            assert part == []


def test_split_counts_use_largest_remainder() -> None:
    assert split_counts(10, (0.7, 0.15, 0.15)) == [7, 2, 1]
    assert split_counts(3, (0.5, 0.5, 0.0)) == [2, 1, 0]
    assert split_counts(0, (0.8, 0.1, 0.1)) == [0, 0, 0]
    assert split_counts(5, (1.0, 0.0, 0.0)) == [5, 0, 0]


def test_split_ratios_parse_from_the_cli_form() -> None:
    parts = split_records(make_records(20), SplitConfig(ratios="70/15/15"))
    assert [len(p) for p in parts] == [14, 3, 3]


def test_same_seed_gives_the_same_split_and_another_seed_a_different_one() -> None:
    records = make_records(200, categories=["billing", "shipping", "returns"])
    first = split_records(records, SplitConfig(seed=7))
    again = split_records([dict(r) for r in records], SplitConfig(seed=7))
    other = split_records(records, SplitConfig(seed=8))
    assert [ids(p) for p in first] == [ids(p) for p in again]
    assert [ids(p) for p in first] != [ids(p) for p in other]


def test_every_record_lands_in_exactly_one_split() -> None:
    records = make_records(123, categories=["a", "b"], pieces=3)
    train, val, test = split_records(records, SplitConfig(ratios=(0.6, 0.2, 0.2), seed=3))
    placed = ids(train) + ids(val) + ids(test)
    assert sorted(placed) == sorted(ids(records))
    assert len(placed) == len(set(placed))


def test_pieces_of_one_conversation_never_straddle_splits() -> None:
    records = make_records(300, categories=["a", "b", "c"], pieces=4)
    parts = split_records(records, SplitConfig(ratios=(0.5, 0.25, 0.25), seed=1))
    split_of_group: dict[str, set[int]] = {}
    for split_index, part in enumerate(parts):
        for record in part:
            split_of_group.setdefault(record["meta"]["group"], set()).add(split_index)
    assert all(len(splits) == 1 for splits in split_of_group.values())
    # 75 groups split 50/25/25 by groups, not by records
    assert [len(part) // 4 for part in parts] == split_counts(75, (0.5, 0.25, 0.25))


def test_records_without_a_group_are_groups_of_their_own() -> None:
    records = make_records(10, pieces=5) + make_records(30)[10:]  # two groups of 5, then 20 loose records
    parts = split_records(records, SplitConfig(ratios=(0.5, 0.5, 0.0), seed=2))
    groups_per_split = [len({r["meta"].get("group", r["id"]) for r in part}) for part in parts]
    assert groups_per_split == split_counts(2 + 20, (0.5, 0.5, 0.0))


def test_stratification_keeps_each_category_share_close_in_every_split() -> None:
    # a skewed mix: 60% billing, 30% shipping, 10% returns, in runs so that input order is no help
    categories = ["billing"] * 6 + ["shipping"] * 3 + ["returns"]
    records = make_records(1000, categories=sorted(categories))
    for seed in range(5):
        parts = split_records(records, SplitConfig(ratios=(0.8, 0.1, 0.1), seed=seed))
        overall = Counter(r["meta"]["category"] for r in records)
        for part in parts:
            in_part = Counter(r["meta"]["category"] for r in part)
            for category, total in overall.items():
                expected = total * len(part) / len(records)
                assert abs(in_part[category] - expected) <= 2, (seed, category, in_part, len(part))


def test_a_rare_category_is_spread_like_the_ratios() -> None:
    records = make_records(100, categories=["common"] * 9 + ["rare"])  # 10 rare records
    for seed in range(20):
        parts = split_records(records, SplitConfig(ratios=(0.8, 0.1, 0.1), seed=seed))
        rare_per_split = [sum(r["meta"]["category"] == "rare" for r in part) for part in parts]
        assert all(abs(rare - expected) <= 1 for rare, expected in zip(rare_per_split, [8, 1, 1])), rare_per_split


def test_stratifies_by_the_configured_field_and_tolerates_records_without_it() -> None:
    records = make_records(90)
    for i, record in enumerate(records[:60]):
        record["meta"]["topic"] = "x" if i % 2 else "y"
    parts = split_records(records, SplitConfig(ratios=(1, 1, 1), stratify_by="topic", seed=4))
    assert [len(p) for p in parts] == [30, 30, 30]
    for part in parts:
        topics = Counter(r["meta"].get("topic") for r in part)
        assert all(abs(topics[topic] - 10) <= 1 for topic in ("x", "y", None)), topics


def test_output_keeps_input_order_inside_each_split() -> None:
    records = make_records(50, categories=["a", "b"])
    position = {r["id"]: i for i, r in enumerate(records)}
    for part in split_records(records, SplitConfig(seed=9)):
        assert [position[r["id"]] for r in part] == sorted(position[r["id"]] for r in part)


def test_empty_input_gives_three_empty_splits() -> None:
    assert split_records([], SplitConfig()) == ([], [], [])


def test_group_key_can_be_renamed() -> None:
    records = make_records(40)
    for i, record in enumerate(records):
        record["meta"]["thread"] = i // 10
    parts = split_records(records, SplitConfig(ratios=(0.5, 0.5, 0.0)), group_key="thread")
    assert [len(p) for p in parts] == [20, 20, 0]
    assert all(len({r["meta"]["thread"] for r in part}) == 2 for part in parts[:2])
