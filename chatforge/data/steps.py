"""The record-list steps of `prepare`, each a function from records to records plus what it set aside.

Use it like this (as `prepare` does)::

    kept, duplicates = deduplicate(records, cfg.dedup)
    kept, dropped, fit_info = fit_to_context(kept, cfg.fit, log)

Each function is switched by its config's `enabled` and returns its input unchanged when switched off, so the
orchestration in `prepare.py` reads as a straight line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatforge.config import AugmentConfig, BalanceConfig, DedupConfig, FitConfig, SplitConfig
from chatforge.core.records import Record
from chatforge.data.augment import augment_records
from chatforge.data.balance import balance_records, count_categories, label_categories
from chatforge.data.fit import fit_records, token_stats
from chatforge.data.split import split_records
from chatforge.models.source import load_tokenizer


def dedup_text(record: Record) -> str:
    """The text two conversations are compared on: every turn with its role."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def deduplicate(records: list[Record], cfg: DedupConfig) -> tuple[list[Record], list[dict[str, Any]]]:
    """Keep the first of each group of exact/near duplicates; the others come back with the id they duplicate."""
    if not cfg.enabled or not records:
        return records, []
    # lazy: dedup's datasketch pulls in scipy, ~2 s to import (python -X importtime); paid only when this step runs
    # (on by default), not by --no-dedup runs nor by code that imports prepare without running it
    from chatforge.data.dedup import find_duplicates

    matches = find_duplicates([dedup_text(r) for r in records], cfg)
    duplicate_of = {m.index: m for m in matches}
    kept = [r for i, r in enumerate(records) if i not in duplicate_of]
    duplicates = [
        {**records[m.index], "duplicate_of": records[m.kept_index]["id"], "kind": m.kind,
         "similarity": round(m.similarity, 4)}
        for m in sorted(matches, key=lambda m: m.index)
    ]
    return kept, duplicates


def fit_to_context(
    records: list[Record], cfg: FitConfig, log: Callable[[str], None]
) -> tuple[list[Record], list[tuple[Record, str]], dict[str, Any]]:
    """Count tokens with the target model's tokenizer and template; split, truncate or drop what is too long."""
    if not cfg.enabled or not records:
        return records, [], {}
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template)
    result = fit_records(records, tokenizer, cfg)
    stats = token_stats(result.token_counts)
    info = {
        "model": cfg.model or "default (gemma3-270m)",
        "max_tokens": cfg.max_tokens,
        "overflow": cfg.overflow,
        "token_stats": stats,
        "token_counts": result.token_counts,
        "split_sources": result.split_sources,
        "pieces_added": result.pieces_added,
        "truncated": result.truncated,
        "dropped": len(result.dropped),
        "dropped_pieces": result.dropped_pieces,  # taken out by prepare (records, not card material)
    }
    log(f"tokens per example: median {stats.get('median', 0):.0f}, p95 {stats.get('p95', 0):.0f}, "
        f"max {stats.get('max', 0):.0f}; {result.split_sources} split, {result.truncated} truncated, "
        f"{len(result.dropped)} dropped, {len(result.dropped_pieces)} pieces of kept conversations dropped")
    return result.records, result.dropped, info


def group_key(record: Record) -> str:
    """The source conversation a record came from: its own id, or meta.group for a piece of a split one."""
    return record["meta"].get("group", record["id"])


def balance_cap(
    records: list[Record], cfg: BalanceConfig
) -> tuple[list[Record], list[tuple[Record, str]], list[tuple[Record, str]], dict[str, Any]]:
    """In cap mode, remove conversations of over-represented categories before the split.

    Pieces of a split conversation go together, and count as that one conversation (the category of its first
    piece): returns kept records, removed conversations (their first piece, with the reason), their other pieces,
    and the balance info.
    """
    if not cfg.enabled:
        return records, [], [], {}
    if cfg.mode != "cap":  # only label now (keyword rules fill meta[by]) so the split can stratify; upsample later
        labelled, categories = label_categories(records, cfg)
        return labelled, [], [], {"before": count_categories(categories)}
    first_pieces: dict[str, Record] = {}
    for record in records:
        first_pieces.setdefault(group_key(record), record)
    result = balance_records(list(first_pieces.values()), cfg, mode="cap")
    info = {"before": result.before, "after": result.after, "skipped_reason": result.skipped_reason}
    category_of = {group_key(r): r["meta"].get(cfg.by) for r in result.kept}  # labels from keyword rules included
    removed_reason = {group_key(r): reason for r, reason in result.removed}
    kept = [{**r, "meta": {**r["meta"], cfg.by: category_of[group_key(r)]}} if category_of[group_key(r)] is not None
            else r for r in records if group_key(r) in category_of]
    other_pieces = [(r, removed_reason[group_key(r)]) for r in records
                    if group_key(r) in removed_reason and r is not first_pieces[group_key(r)]]
    return kept, result.removed, other_pieces, info


def balance_upsample(train: list[Record], cfg: BalanceConfig, info: dict[str, Any]) -> tuple[list[Record], dict[str, Any]]:
    """In upsample mode, add copies of under-represented categories to train only (copies never cross splits)."""
    if not cfg.enabled or cfg.mode != "upsample":
        return [], info
    result = balance_records(train, cfg, mode="upsample")
    return result.added, {**info, "after": result.after, "skipped_reason": result.skipped_reason}


def augment_train(train: list[Record], cfg: AugmentConfig) -> list[Record]:
    """Augmented copies of training records (marked in meta); they only ever go to train."""
    if not cfg.enabled or not train:
        return []
    return augment_records(train, cfg)


def split(records: list[Record], cfg: SplitConfig) -> tuple[list[Record], list[Record], list[Record]]:
    """Seeded, stratified train/val/test split that keeps pieces of one conversation together."""
    return split_records(records, cfg, group_key="group")
