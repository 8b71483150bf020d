"""Split records into train, validation and test sets, keeping conversations whole and categories balanced.

Use it like this::

    train, val, test = split_records(records, SplitConfig(ratios=(0.8, 0.1, 0.1), seed=0))

The unit of splitting is a group: records whose `meta["group"]` is equal (the pieces of one long conversation that
was cut to fit the context) always land in the same split, so no conversation leaks from train into test. A record
without that key is a group of its own. Group counts per split are the ratios times the number of groups, rounded
by largest remainder so they add up exactly (a ratio of 0 gives an empty split). When any record has
`meta[cfg.stratify_by]`, every category is spread over the splits in about the same proportions. The same records
and seed always give the same split; inside each split records keep their input order.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable
from typing import Any

from chatforge.config import SplitConfig
from chatforge.core.records import Record

_NO_CATEGORY = object()  # the stratum of groups without the field (when no record has it, every group is in it)


def split_records(
    records: list[Record], cfg: SplitConfig, group_key: str = "group"
) -> tuple[list[Record], list[Record], list[Record]]:
    """`train, val, test = split_records(records, cfg)`: every record lands in exactly one of the three lists.

    How: groups are shuffled with `cfg.seed` inside their category, given evenly spaced positions in [0, 1) within
    that category (systematic sampling with a random start), then all groups are ordered by position and cut by
    the global counts. Each category therefore fills every split in proportion, give or take one group.
    """
    if not records:
        return [], [], []
    group_of_record = [_group_id(record, index, group_key) for index, record in enumerate(records)]
    groups = list(dict.fromkeys(group_of_record))  # first-appearance order, so the seed alone decides the shuffle
    category_of_group = _categories(records, group_of_record, cfg.stratify_by)
    counts = split_counts(len(groups), cfg.ratios)

    rng = random.Random(cfg.seed)
    ordered_groups = _stratified_order(groups, category_of_group, rng)
    split_of_group: dict[Hashable, int] = {}
    cut = 0
    for split_index, count in enumerate(counts):
        for group in ordered_groups[cut : cut + count]:
            split_of_group[group] = split_index
        cut += count

    splits: tuple[list[Record], list[Record], list[Record]] = ([], [], [])
    for record, group in zip(records, group_of_record):
        splits[split_of_group[group]].append(record)
    return splits


def split_counts(total: int, ratios: tuple[float, float, float]) -> list[int]:
    """`split_counts(10, (0.7, 0.15, 0.15))` -> [7, 2, 1]: largest-remainder rounding that sums to `total`.

    Each count is within one of ratio x total; ties in the remainder go to the earlier split, and a ratio of 0
    never receives a unit.
    """
    ratio_sum = sum(ratios)
    shares = [total * ratio / ratio_sum for ratio in ratios]
    counts = [math.floor(share) for share in shares]
    positive = [i for i, ratio in enumerate(ratios) if ratio > 0]
    by_remainder = sorted(positive, key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _group_id(record: Record, index: int, group_key: str) -> Hashable:
    """The group a record belongs to: its `meta[group_key]` value, else its own id.

    Ids and group values share one key space on purpose: `fit` gives the pieces of a cut conversation
    `group` = the original record's id.
    """
    value = (record.get("meta") or {}).get(group_key)
    if value is not None:
        return _hashable(value)
    if "id" in record:
        return record["id"]
    return ("record without id", index)


def _categories(records: list[Record], group_of_record: list[Hashable], field: str) -> dict[Hashable, Hashable]:
    """The category of each group that has one: the first `meta[field]` value among its records."""
    category_of_group: dict[Hashable, Hashable] = {}
    for record, group in zip(records, group_of_record):
        value = (record.get("meta") or {}).get(field)
        if value is not None:
            category_of_group.setdefault(group, _hashable(value))
    return category_of_group


def _stratified_order(
    groups: list[Hashable], category_of_group: dict[Hashable, Hashable], rng: random.Random
) -> list[Hashable]:
    """Groups ordered so that any prefix holds each category in about its overall share.

    Within a category of n groups, the shuffled i-th group sits at (i + u) / n with one random u per category;
    a random tie-break keeps equal positions of different categories from always favouring the same one.
    """
    members: dict[Hashable, list[Hashable]] = {}
    for group in groups:
        members.setdefault(category_of_group.get(group, _NO_CATEGORY), []).append(group)
    positioned: list[tuple[float, float, Hashable]] = []
    for category_groups in members.values():
        rng.shuffle(category_groups)
        offset = rng.random()
        size = len(category_groups)
        for i, group in enumerate(category_groups):
            positioned.append(((i + offset) / size, rng.random(), group))
    positioned.sort(key=lambda item: (item[0], item[1]))
    return [group for _, _, group in positioned]


def _hashable(value: Any) -> Hashable:
    """Meta values come from JSON; lists and dicts become their canonical JSON text so they can key a dict."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return value
