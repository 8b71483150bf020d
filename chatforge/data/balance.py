"""Even out how many conversations each category has, by capping big categories or copying small ones.

Use it like this::

    result = balance_records(records, cfg.prepare.balance)                 # cfg.mode, "cap" by default
    records = result.kept                                                  # before the train/val/test split
    result = balance_records(train, cfg.prepare.balance, mode="upsample")  # on the train split only
    train = result.kept + result.added
    result.before, result.after, result.removed[0]   # {'billing': 300, ...}, ..., (record, "balance: ...")

A record's category is `meta[cfg.by]`; when that is missing, the first of `cfg.keyword_rules` with a keyword in
one of its user messages (case-insensitive, whole words) decides, and the kept record gets it in `meta[cfg.by]`.
Records with no category count as "(none)" and are never removed or copied.

The target is "uniform" (every category the same size) or a dict of wanted fractions over categories (normalised;
categories not in the dict, and dict categories with no records, are left as they are). "cap" removes a seeded
random choice of records from over-represented categories, keeping as many records as the target allows; "upsample"
adds copies (`<id>-up1`, `<id>-up2`, ..., `meta["upsampled_from"] = <id>`) of under-represented categories, going
through all originals of a category in a seeded random order before copying any of them twice. `cfg.enabled` is
the caller's switch: this function always balances.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from chatforge.config import BalanceConfig
from chatforge.core.records import Record

NO_CATEGORY = "(none)"
MODES = ("cap", "upsample")


@dataclass
class BalanceResult:
    """What `balance_records` did: every input record is in `kept` or `removed`; `added` holds new copies."""

    kept: list[Record]  # records that stay, in input order
    removed: list[tuple[Record, str]]  # capped-out records with the reason
    added: list[Record]  # upsampled copies
    before: dict[str, int]  # records per category in the input ("(none)" for no category)
    after: dict[str, int]  # records per category in kept + added
    skipped_reason: str | None = None  # why nothing was removed or added


def categorise(record: Record, cfg: BalanceConfig) -> str | None:
    """The record's category: `meta[cfg.by]`, else the first keyword rule matching a user message, else None."""
    value = (record.get("meta") or {}).get(cfg.by)
    if value is not None and value != "":
        return str(value)
    rules = _compiled_keyword_rules(tuple((category, tuple(words)) for category, words in cfg.keyword_rules.items()))
    if not rules:
        return None
    user_texts = [str(m.get("content", "")) for m in record.get("messages", []) if m.get("role") == "user"]
    for category, pattern in rules:
        if any(pattern.search(text) for text in user_texts):
            return category
    return None


@lru_cache(maxsize=32)
def _compiled_keyword_rules(rules: tuple[tuple[str, tuple[str, ...]], ...]) -> list[tuple[str, re.Pattern[str]]]:
    compiled = []
    for category, keywords in rules:
        words = sorted({k.strip() for k in keywords if k.strip()}, key=len, reverse=True)
        if words:
            # (?<!\w)...(?!\w) rather than \b so keywords that start or end in a symbol ('c++', '#refund') work.
            alternatives = "|".join(re.escape(word) for word in words)
            compiled.append((category, re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)))
    return compiled


def label_categories(records: list[Record], cfg: BalanceConfig) -> tuple[list[Record], list[str | None]]:
    """Each record's category (see `categorise`), written into meta[cfg.by] where a keyword rule found it."""
    categories = [categorise(record, cfg) for record in records]
    return [_with_category(record, category, cfg.by) for record, category in zip(records, categories)], categories


def balance_records(records: list[Record], cfg: BalanceConfig, mode: str | None = None) -> BalanceResult:
    """Cap or upsample categories towards `cfg.target`; `mode` overrides `cfg.mode`. See the module docstring."""
    mode = mode or cfg.mode
    if mode not in MODES:
        raise ValueError(f"balance mode {mode!r}: expected one of {', '.join(MODES)}")
    labelled, categories = label_categories(records, cfg)
    before = count_categories(categories)

    def unchanged(reason: str) -> BalanceResult:
        return BalanceResult(
            kept=labelled, removed=[], added=[], before=before, after=dict(before), skipped_reason=reason
        )

    if all(category is None for category in categories):
        return unchanged(f"no record has a category (meta.{cfg.by} or a keyword rule)")
    indices_by_category: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        if category is not None:
            indices_by_category.setdefault(category, []).append(index)
    fractions = target_fractions(cfg.target, {c: len(ix) for c, ix in indices_by_category.items()})
    if not fractions:
        if not cfg.target:
            return unchanged("the target names no categories")
        return unchanged(f"none of the target's categories {sorted(cfg.target)} occur in the data")

    if mode == "cap":
        removed_indices = _cap(indices_by_category, fractions, cfg.seed)
        kept = [record for index, record in enumerate(labelled) if index not in removed_indices]
        removed = [(labelled[index], reason) for index, reason in sorted(removed_indices.items())]
        added: list[Record] = []
    else:
        kept, removed = labelled, []
        added = _upsample(labelled, indices_by_category, fractions, cfg)
    if not removed and not added:
        return unchanged("categories already match the target")
    after = count_categories([categorise(record, cfg) for record in kept + added])
    return BalanceResult(kept=kept, removed=removed, added=added, before=before, after=after)


def target_fractions(target: str | dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Wanted share per present category, summing to one: 'uniform' -> equal shares; a dict -> its values normalised.

    Categories with no records are dropped (nothing to cap or copy), as are present ones a dict does not name.
    """
    present = [category for category, count in counts.items() if count > 0]
    if target == "uniform":
        return {category: 1 / len(present) for category in present}
    if isinstance(target, str):
        raise ValueError(f"balance target {target!r}: expected 'uniform' or a mapping of category -> fraction")
    bad = {category: share for category, share in target.items() if not share >= 0 or math.isinf(share)}
    if bad:
        raise ValueError(f"balance target: fractions must be non-negative numbers, got {bad}")
    wanted = {category: float(share) for category, share in target.items() if category in present}
    total = sum(wanted.values())
    if wanted and total == 0:
        raise ValueError(f"balance target: the fractions of {sorted(wanted)} are all zero")
    return {category: share / total for category, share in wanted.items()}


def count_categories(categories: list[str | None]) -> dict[str, int]:
    """Records per category, sorted by name, with "(none)" for no category last."""
    counts = Counter(NO_CATEGORY if category is None else category for category in categories)
    names = sorted(name for name in counts if name != NO_CATEGORY)
    if NO_CATEGORY in counts:
        names.append(NO_CATEGORY)
    return {name: counts[name] for name in names}


def _cap(indices_by_category: dict[str, list[int]], fractions: dict[str, float], seed: int) -> dict[int, str]:
    """Pick which records to remove: index -> reason. The largest total T with share*T <= count for every category."""
    total = min(len(indices_by_category[c]) / share for c, share in fractions.items() if share > 0)
    removed: dict[int, str] = {}
    for category, share in fractions.items():
        indices = indices_by_category[category]
        keep_count = min(len(indices), math.floor(share * total + 1e-9))
        if keep_count == len(indices):
            continue
        # One generator per category, so adding records of one category does not reshuffle the others.
        keep = set(random.Random(f"{seed}:cap:{category}").sample(indices, keep_count))
        reason = f"balance: category '{category}' capped at {keep_count} of {len(indices)}"
        removed.update((index, reason) for index in indices if index not in keep)
    return removed


def _upsample(
    records: list[Record], indices_by_category: dict[str, list[int]], fractions: dict[str, float], cfg: BalanceConfig
) -> list[Record]:
    """Copies that lift each category to share*T, where T is the smallest total no category has to shrink for."""
    total = max(len(indices_by_category[c]) / share for c, share in fractions.items() if share > 0)
    added = []
    for category, share in sorted(fractions.items()):
        indices = indices_by_category[category]
        missing = math.floor(share * total + 1e-9) - len(indices)
        if missing <= 0:
            continue
        order = list(indices)
        random.Random(f"{cfg.seed}:upsample:{category}").shuffle(order)
        for copy_index in range(missing):
            original = records[order[copy_index % len(order)]]
            added.append(_upsampled_copy(original, copy_index // len(order) + 1))
    return added


def _upsampled_copy(original: Record, copy_number: int) -> Record:
    duplicate = copy.deepcopy(original)
    duplicate["id"] = f"{original['id']}-up{copy_number}"
    duplicate.setdefault("meta", {})["upsampled_from"] = original["id"]
    return duplicate


def _with_category(record: Record, category: str | None, field: str) -> Record:
    """The record itself, or a shallow copy with the keyword-derived category written into meta[field]."""
    meta = record.get("meta") or {}
    if category is None or meta.get(field) not in (None, ""):
        return record
    return {**record, "meta": {**meta, field: category}}
