"""The data card of a prepared dataset: `card.json`, `card.md` and `token_lengths.png`.

Use it like this (as `prepare` does)::

    card = write_card(out_dir, counts=..., formats=..., pii_counts=..., fit_info=..., balance_info=..., cfg=cfg,
                      rejected=rejected_entries)
    print(summary_lines(card))

The card says where the data came from, how many records each step kept or set aside and why, which PII types were
replaced how often (never the values), token statistics and the category balance.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from chatforge.config import PrepareConfig

STEP_ROWS = [
    ("read", "records read"),
    ("trimmed", "kept after trimming trailing user turns (validate.trailing_user: trim)"),
    ("invalid", "rejected as invalid or too large (validate)"),
    ("empty_after_cleaning", "rejected as empty after cleaning"),
    ("duplicates", "removed as duplicates"),
    ("dropped_over_max_tokens", "dropped as too long (fit)"),
    ("pieces_dropped", "pieces of kept long conversations dropped (fit; in rejected.jsonl, not in the identity)"),
    ("capped_by_balance", "removed by balance cap"),
    ("pieces_capped", "further pieces of those capped conversations (in rejected.jsonl, not in the identity)"),
    ("kept", "kept (source records)"),
    ("train_sources", "train (source records)"),
    ("val_sources", "val (source records)"),
    ("test_sources", "test (source records)"),
    ("pieces_from_long_conversations", "extra examples from splitting long conversations"),
    ("upsampled", "upsampled copies (train)"),
    ("augmented", "augmented copies (train)"),
    ("train", "train examples written"),
    ("val", "val examples written"),
    ("test", "test examples written"),
]


MAX_REASON_KINDS = 50  # more distinct reasons are summed in one 'other reasons' row, so the table still adds up


def rejection_reasons(rejected: list[dict[str, Any]]) -> dict[str, int]:
    """Each kind of rejection reason with how many records it rejected, most frequent first (adds up to the total)."""
    kinds = Counter(_reason_kind(entry["reason"]) for entry in rejected).most_common()
    reasons = dict(kinds[:MAX_REASON_KINDS])
    if len(kinds) > MAX_REASON_KINDS:
        reasons["other reasons"] = sum(n for _, n in kinds[MAX_REASON_KINDS:])
    return reasons


def _reason_kind(reason: str) -> str:
    """Group rejection reasons: drop positions and numbers so 'message 2 …' and 'message 3 …' count together."""
    words = ["N" if w.strip("():,").isdigit() else w for w in reason.split()]
    return " ".join(words)[:120]


def write_token_histogram(token_counts: list[int], max_tokens: int | None, path: Path) -> None:
    """Histogram of tokens per example, with the max_tokens limit marked."""
    # lazy: matplotlib.pyplot takes ~2 s to import (python -X importtime), and only this plot needs it (the CLI
    # imports this module for `summary_lines`)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    if token_counts:
        ax.hist(token_counts, bins=min(60, max(5, len(set(token_counts)))), color="#4063d8")
    if max_tokens:
        ax.axvline(max_tokens, color="#cb3c33", linestyle="--", label=f"max_tokens {max_tokens}")
        ax.legend()
    ax.set_xlabel("tokens per example (with chat template)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths" if token_counts else "Token lengths (fit step off)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_card(
    out: Path,
    *,
    counts: dict[str, Any],
    formats: dict[str, str],
    pii_counts: dict[str, int],
    fit_info: dict[str, Any],
    balance_info: dict[str, Any],
    cfg: PrepareConfig,
    rejected: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write card.json, card.md and token_lengths.png into `out`; returns the card as a dict."""
    token_counts = fit_info.get("token_counts", [])
    stats = fit_info.get("token_stats", {})
    train_share = counts.get("train", 0) / max(1, counts.get("train", 0) + counts.get("val", 0) + counts.get("test", 0))
    card = {
        "sources": [{"file": path, "format": fmt} for path, fmt in formats.items()],
        "counts": counts,
        "rejection_reasons": rejection_reasons(rejected),
        "pii_replaced": pii_counts,
        "tokens": {
            "model": fit_info.get("model"),
            "max_tokens": fit_info.get("max_tokens"),
            "overflow": fit_info.get("overflow"),
            "stats": stats,
            "estimated_train_tokens_per_epoch": round(stats.get("total", 0) * train_share),
        },
        "balance": {k: v for k, v in balance_info.items() if k != "token_counts"},
        "split": {"ratios": list(cfg.split.ratios), "seed": cfg.split.seed},
        "steps_enabled": {
            "clean": cfg.clean.enabled, "pii": cfg.pii.enabled, "dedup": cfg.dedup.enabled, "fit": cfg.fit.enabled,
            "balance": cfg.balance.enabled, "augment": cfg.augment.enabled,
        },
    }
    (out / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_token_histogram(token_counts, fit_info.get("max_tokens"), out / "token_lengths.png")
    (out / "card.md").write_text(card_markdown(card), encoding="utf-8")
    return card


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a Markdown page (what a reviewer reads before training on the data)."""
    counts = card["counts"]
    lines = ["# Data card", "", "## Sources", "", "| file | format |", "|---|---|"]
    lines += [f"| `{s['file']}` | {s['format']} |" for s in card["sources"]]
    lines += ["", "## Where every record went", "", "| step | records |", "|---|---:|"]
    lines += [f"| {label} | {counts[key]} |" for key, label in STEP_ROWS if key in counts]
    lines += ["", f"Identity: read {counts['read']} = kept {counts['kept']} + rejected {counts['rejected']} + "
              f"duplicates {counts['duplicates']} (before splitting and augmentation)."]
    if counts.get("trimmed"):
        lines += ["", (f"{counts['trimmed']} conversations ended with user turns that have no answer; those turns were "
                       "trimmed off and the rest kept (meta.trimmed_turns says how many).")]
    if card["rejection_reasons"]:
        lines += ["", "## Why records were rejected (see rejected.jsonl)", "", "| reason | records |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in card["rejection_reasons"].items()]
    lines += ["", "## PII and secrets replaced", ""]
    if card["pii_replaced"]:
        lines += ["| type | replaced |", "|---|---:|"]
        lines += [f"| {kind} | {n} |" for kind, n in sorted(card["pii_replaced"].items())]
    else:
        lines.append("None found." if card["steps_enabled"]["pii"] else "PII redaction was switched off.")
    tokens = card["tokens"]
    lines += ["", "## Tokens", ""]
    if tokens["stats"]:
        s = tokens["stats"]
        lines += [f"Tokenizer: {tokens['model']}; max_tokens {tokens['max_tokens']}, overflow `{tokens['overflow']}`.", "",
                  "| min | median | p95 | max | total |", "|---:|---:|---:|---:|---:|",
                  f"| {s['min']:.0f} | {s['median']:.0f} | {s['p95']:.0f} | {s['max']:.0f} | {s['total']:.0f} |", "",
                  f"Estimated training tokens per epoch: {tokens['estimated_train_tokens_per_epoch']}.", "",
                  "![token lengths](token_lengths.png)"]
    else:
        lines.append("The fit step was switched off; no token counts.")
    balance = card["balance"]
    if balance:
        lines += ["", "## Category balance", ""]
        if balance.get("skipped_reason"):
            lines.append(f"Skipped: {balance['skipped_reason']}")
        else:
            before, after = balance.get("before", {}), balance.get("after", balance.get("before", {}))
            lines += ["| category | before | after |", "|---|---:|---:|"]
            lines += [f"| {c} | {before.get(c, 0)} | {after.get(c, 0)} |" for c in sorted(set(before) | set(after))]
    split = card["split"]
    lines += ["", "## Split", "", f"Ratios {'/'.join(f'{r:.2f}' for r in split['ratios'])}, seed {split['seed']}: "
              f"train {counts['train']}, val {counts['val']}, test {counts['test']} examples.", ""]
    return "\n".join(lines)


def summary_lines(card: dict[str, Any]) -> list[str]:
    """A few lines for the terminal after `prepare`."""
    counts = card["counts"]
    lines = [
        f"read {counts['read']}: kept {counts['kept']}, rejected {counts['rejected']}, duplicates {counts['duplicates']}"
        + (f" ({counts['trimmed']} kept after trimming trailing user turns)" if counts.get("trimmed") else ""),
        f"train {counts['train']} / val {counts['val']} / test {counts['test']} examples",
        "PII replaced: " + (", ".join(f"{k} {v}" for k, v in sorted(card["pii_replaced"].items())) or "none"),
    ]
    stats = card["tokens"]["stats"]
    if stats:
        lines.append(f"tokens/example: median {stats['median']:.0f}, p95 {stats['p95']:.0f}, max {stats['max']:.0f}; "
                     f"~{card['tokens']['estimated_train_tokens_per_epoch']} training tokens per epoch")
    return lines
