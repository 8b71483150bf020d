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
from chatforge.data.records import Record


def dedup_text(record: Record) -> str:
    """The text two conversations are compared on: every turn with its role."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def deduplicate(records: list[Record], cfg: DedupConfig) -> tuple[list[Record], list[dict[str, Any]]]:
    """Keep the first of each group of exact/near duplicates; the others come back with the id they duplicate."""
    if not cfg.enabled or not records:
        return records, []
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
    from chatforge.data.fit import fit_records, token_stats
    from chatforge.models.source import load_tokenizer

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


def balance_cap(records: list[Record], cfg: BalanceConfig) -> tuple[list[Record], list[tuple[Record, str]], dict[str, Any]]:
    """In cap mode, remove records of over-represented categories before the split."""
    if not cfg.enabled:
        return records, [], {}
    from chatforge.data.balance import balance_records, count_categories, label_categories

    if cfg.mode != "cap":  # only label now (keyword rules fill meta[by]) so the split can stratify; upsample later
        labelled, categories = label_categories(records, cfg)
        return labelled, [], {"before": count_categories(categories)}
    result = balance_records(records, cfg, mode="cap")
    return result.kept, result.removed, {"before": result.before, "after": result.after,
                                         "skipped_reason": result.skipped_reason}


def balance_upsample(train: list[Record], cfg: BalanceConfig, info: dict[str, Any]) -> tuple[list[Record], dict[str, Any]]:
    """In upsample mode, add copies of under-represented categories to train only (copies never cross splits)."""
    if not cfg.enabled or cfg.mode != "upsample":
        return [], info
    from chatforge.data.balance import balance_records

    result = balance_records(train, cfg, mode="upsample")
    return result.added, {**info, "after": result.after, "skipped_reason": result.skipped_reason}


def augment_train(train: list[Record], cfg: AugmentConfig) -> list[Record]:
    """Augmented copies of training records (marked in meta); they only ever go to train."""
    if not cfg.enabled or not train:
        return []
    from chatforge.data.augment import augment_records

    return augment_records(train, cfg)


def split(records: list[Record], cfg: SplitConfig) -> tuple[list[Record], list[Record], list[Record]]:
    """Seeded, stratified train/val/test split that keeps pieces of one conversation together."""
    from chatforge.data.split import split_records

    return split_records(records, cfg, group_key="group")
