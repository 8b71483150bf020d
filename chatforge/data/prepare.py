"""`chatforge prepare`: messy conversation files in, a clean, redacted, deduplicated, split dataset out.

Use it like this::

    report = prepare([Path("tickets.csv"), Path("exports/")], Path("data/ds"), PrepareConfig())
    print(report.counts["train"], report.out_dir / "card.md")

Steps, in order (each switchable in PrepareConfig): read + validate -> clean -> redact PII -> deduplicate ->
fit to context -> balance (cap) -> split -> balance (upsample, train only) -> augment (train only).
Every record read ends in exactly one of train/val/test/rejected/duplicates; `counts` says how many went where and
the identity is checked before anything is written.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from chatforge.config import CleanConfig, PiiConfig, PrepareConfig
from chatforge.data.formats import KNOWN_SUFFIXES, InputError, Rejection, detect_format, read_file
from chatforge.data.records import Record, write_jsonl
from chatforge.data.validate import validate_messages
from chatforge.manifest import Manifest

Log = Callable[[str], None]
PARALLEL_MIN_RECORDS = 2000  # below this, worker start-up costs more than it saves


class StrictModeError(ValueError):
    """Raised with --strict at the first invalid record: 'file:line: reason'."""


@dataclass
class PrepareReport:
    """What `prepare` did: where the outputs are, how many records went where, and the data card."""

    out_dir: Path
    counts: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, folders walked recursively for known suffixes (sorted); InputError for a missing path."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWN_SUFFIXES)
            if not found:
                raise InputError(f"{path}: folder holds no files with a known suffix ({', '.join(sorted(KNOWN_SUFFIXES))})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


def _rejected_record(record: Record, reason: str) -> dict[str, Any]:
    source, _, line = record["meta"]["source"].rpartition(":")
    return {"source": source, "line": int(line), "reason": reason, "record": record}


# --- clean + redact, run in worker processes for large inputs -------------------------------------------------------

_worker_state: dict[str, Any] = {}


def _init_worker(clean_cfg: dict[str, Any], pii_cfg: dict[str, Any], require_assistant_last: bool) -> None:
    from chatforge.data.clean import make_cleaner
    from chatforge.data.pii import Redactor

    clean = CleanConfig.model_validate(clean_cfg)
    pii = PiiConfig.model_validate(pii_cfg)
    _worker_state["clean"] = make_cleaner(clean) if clean.enabled else None
    _worker_state["redactor"] = Redactor.from_config(pii) if pii.enabled else None
    _worker_state["require_assistant_last"] = require_assistant_last


def _clean_and_redact(records: list[Record]) -> tuple[list[Record], list[tuple[Record, str]], Counter[str], int]:
    """Clean and redact a chunk; returns kept records, rejected (record, reason), PII counts, messages changed."""
    clean, redactor = _worker_state["clean"], _worker_state["redactor"]
    kept: list[Record] = []
    rejected: list[tuple[Record, str]] = []
    pii_counts: Counter[str] = Counter()
    changed = 0
    for record in records:
        messages = record["messages"]
        if clean is not None:
            cleaned = [{**m, "content": clean(m["content"])} for m in messages]
            changed += sum(a["content"] != b["content"] for a, b in zip(messages, cleaned))
            messages = cleaned
        if redactor is not None:
            messages, found = redactor.redact_messages(messages)
            pii_counts.update(found)
        record = {**record, "messages": messages}
        reason = validate_messages(messages, _worker_state["require_assistant_last"])
        if reason:
            rejected.append((record, f"after cleaning: {reason}"))
        else:
            kept.append(record)
    return kept, rejected, pii_counts, changed


def clean_and_redact(records: list[Record], cfg: PrepareConfig) -> tuple[list[Record], list[tuple[Record, str]], Counter[str], int]:
    """Clean and redact all records, in parallel when there are enough to pay for the worker start-up."""
    init_args = (cfg.clean.model_dump(), cfg.pii.model_dump(), cfg.require_assistant_last)
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(records) < PARALLEL_MIN_RECORDS:
        _init_worker(*init_args)
        return _clean_and_redact(records)
    chunk_size = max(200, len(records) // (workers * 8))
    chunks = [records[i : i + chunk_size] for i in range(0, len(records), chunk_size)]
    kept: list[Record] = []
    rejected: list[tuple[Record, str]] = []
    pii_counts: Counter[str] = Counter()
    changed = 0
    with get_context("fork" if os.name == "posix" else "spawn").Pool(workers, _init_worker, init_args) as pool:
        for chunk_kept, chunk_rejected, chunk_pii, chunk_changed in pool.imap(_clean_and_redact, chunks):
            kept.extend(chunk_kept)
            rejected.extend(chunk_rejected)
            pii_counts.update(chunk_pii)
            changed += chunk_changed
    return kept, rejected, pii_counts, changed


def _redact_raw(value: Any, redact: Callable[[str], str]) -> Any:
    """Redact every string inside a rejected item, so PII never reaches rejected.jsonl either."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redact_raw(v, redact) for v in value]
    if isinstance(value, dict):
        return {k: _redact_raw(v, redact) for k, v in value.items()}
    return value


def read_inputs(files: list[Path], cfg: PrepareConfig, manifest: Manifest, log: Log) -> tuple[list[Record], list[dict[str, Any]], dict[str, str]]:
    """Read and validate every file; returns valid records, rejected entries and the format found per file."""
    records: list[Record] = []
    rejected: list[dict[str, Any]] = []
    formats: dict[str, str] = {}
    for path in files:
        fmt = cfg.format or detect_format(path)
        formats[str(path)] = fmt
        manifest.add_input(path, format=fmt)
        read_here = 0
        for item in read_file(path, fmt, cfg.formats):
            read_here += 1
            reason = item.reason if isinstance(item, Rejection) else validate_messages(item["messages"], cfg.require_assistant_last)
            if reason and cfg.strict:
                line = item.line if isinstance(item, Rejection) else item["meta"]["source"].rpartition(":")[2]
                raise StrictModeError(f"{path}:{line}: {reason}")
            if isinstance(item, Rejection):
                rejected.append(item.to_json())
            elif reason:
                rejected.append(_rejected_record(item, reason))
            else:
                records.append(item)
        log(f"read {read_here} records from {path} ({fmt})")
    return records, rejected, formats


def prepare(inputs: list[Path], out: Path, cfg: PrepareConfig, log: Log = lambda _msg: None) -> PrepareReport:
    """Run the whole prepare stage; writes the dataset files, card and manifest into `out`."""
    from chatforge.data.card import write_card
    from chatforge.data.steps import balance_cap, balance_upsample, augment_train, deduplicate, fit_to_context, split

    manifest = Manifest.start("prepare", config=cfg.model_dump(mode="json"))
    files = expand_inputs(inputs)
    with manifest.timed("read_validate"):
        records, rejected, formats = read_inputs(files, cfg, manifest, log)
    counts: dict[str, Any] = {"read": len(records) + len(rejected), "invalid": len(rejected)}
    log(f"{counts['read']} records read, {len(rejected)} invalid")

    with manifest.timed("clean_redact"):
        records, cleaned_out, pii_counts, changed = clean_and_redact(records, cfg)
    rejected.extend(_rejected_record(record, reason) for record, reason in cleaned_out)
    counts |= {"messages_changed_by_cleaning": changed, "empty_after_cleaning": len(cleaned_out)}
    if cfg.pii.enabled:
        from chatforge.data.pii import Redactor

        redactor = Redactor.from_config(cfg.pii)
        rejected = [_redact_raw(entry, lambda text: redactor.redact(text)[0]) for entry in rejected]
    log(f"cleaned {changed} messages; PII replaced: {dict(pii_counts) or 'none'}")

    with manifest.timed("dedup"):
        records, duplicates = deduplicate(records, cfg.dedup)
    counts["duplicates"] = len(duplicates)
    log(f"{len(duplicates)} duplicates removed")

    with manifest.timed("fit"):
        records, fit_dropped, fit_info = fit_to_context(records, cfg.fit, log)
    rejected.extend(_rejected_record(record, reason) for record, reason in fit_dropped)
    counts["dropped_over_max_tokens"] = len(fit_dropped)

    with manifest.timed("balance"):
        records, capped, balance_info = balance_cap(records, cfg.balance)
    rejected.extend(_rejected_record(record, reason) for record, reason in capped)
    counts["capped_by_balance"] = len(capped)

    with manifest.timed("split"):
        train, val, test = split(records, cfg.split)
    kept_sources = {r["meta"].get("group", r["id"]) for r in records}
    counts |= {"kept": len(kept_sources), "rejected": len(rejected)}
    for name, part in (("train", train), ("val", val), ("test", test)):
        counts[f"{name}_sources"] = len({r["meta"].get("group", r["id"]) for r in part})
    if counts["read"] != counts["kept"] + counts["rejected"] + counts["duplicates"]:
        raise RuntimeError(f"record accounting does not add up: {counts}")  # a bug in chatforge, never user error

    with manifest.timed("augment"):
        upsampled, balance_info = balance_upsample(train, cfg.balance, balance_info)
        augmented = augment_train(train, cfg.augment)
    train = train + upsampled + augmented
    counts |= {"train": len(train), "val": len(val), "test": len(test), "upsampled": len(upsampled),
               "augmented": len(augmented), "pieces_from_long_conversations": fit_info.get("pieces_added", 0)}

    out.mkdir(parents=True, exist_ok=True)
    with manifest.timed("write"):
        for name, part in (("train", train), ("val", val), ("test", test), ("rejected", rejected), ("duplicates", duplicates)):
            write_jsonl(out / f"{name}.jsonl", part)
        card = write_card(out, counts=counts, formats=formats, pii_counts=dict(pii_counts), fit_info=fit_info,
                          balance_info=balance_info, cfg=cfg, rejected=rejected)
    manifest.counts = counts
    manifest.outputs = {name: f"{name}.jsonl" for name in ("train", "val", "test", "rejected", "duplicates")}
    manifest.outputs |= {"card": "card.md", "card_json": "card.json", "token_histogram": "token_lengths.png"}
    manifest.extra["pii_counts"] = dict(pii_counts)
    manifest.write(out)
    log(f"wrote {out}")
    return PrepareReport(out_dir=out, counts=counts, card=card)
