"""`chatforge prepare`: messy conversation files in, a clean, redacted, deduplicated, split dataset out.

Use it like this::

    report = prepare([Path("tickets.csv"), Path("exports/")], Path("data/ds"), PrepareConfig())
    print(report.counts["train"], report.out_dir / "card.md")

Steps, in order (each switchable in PrepareConfig): read + validate -> clean -> redact PII -> deduplicate ->
fit to context -> balance (cap) -> split -> balance (upsample, train only) -> augment (train only).
Every record read ends in exactly one of train/val/test/rejected/duplicates; `counts` says how many went where and
the identity is checked before anything is written. Every string written to any file (and every log line) passes
the redactor (`scrub.Scrubber`), and the files are written into a staging folder that replaces `out` only when all
of them were written (`outputs.staged_output`): a failed run leaves the previous dataset as it was.
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
from chatforge.core.pii import Redactor
from chatforge.core.records import Record, write_jsonl
from chatforge.data.card import write_card
from chatforge.data.clean import make_cleaner
from chatforge.data.formats import KNOWN_SUFFIXES, InputError, Rejection, detect_format, read_file
from chatforge.data.outputs import staged_output
from chatforge.data.scrub import Scrubber
from chatforge.data.steps import (
    augment_train,
    balance_cap,
    balance_upsample,
    deduplicate,
    fit_to_context,
    group_key,
    split,
)
from chatforge.data.validate import check_record, size_problem, validate_messages
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


def _rejected_record(record: Record, reason: str, with_content: bool = True) -> dict[str, Any]:
    source, _, line = record["meta"]["source"].rpartition(":")
    return {"source": source, "line": int(line), "reason": reason, "record": record if with_content else None}


def _make_scrubber(pii: PiiConfig) -> Scrubber:
    return Scrubber(Redactor.from_config(pii) if pii.enabled else None)


# --- clean + redact, run in worker processes for large inputs -------------------------------------------------------

_worker_state: dict[str, Any] = {}


def _init_worker(clean_cfg: dict[str, Any], pii_cfg: dict[str, Any], require_assistant_last: bool) -> None:
    clean = CleanConfig.model_validate(clean_cfg)
    pii = PiiConfig.model_validate(pii_cfg)
    _worker_state["clean"] = make_cleaner(clean) if clean.enabled else None
    _worker_state["redactor"] = Redactor.from_config(pii) if pii.enabled else None
    _worker_state["scrubber"] = _make_scrubber(pii)  # meta values and keys (also makes them JSON-safe)
    _worker_state["require_assistant_last"] = require_assistant_last


def _clean_and_redact(records: list[Record]) -> tuple[list[Record], list[tuple[Record, str]], Counter[str], int]:
    """Clean and redact a chunk; returns kept records, rejected (record, reason), PII counts, messages changed."""
    clean, redactor, scrubber = _worker_state["clean"], _worker_state["redactor"], _worker_state["scrubber"]
    scrubber.counts.clear()
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
        record = scrubber.record({**record, "messages": messages})
        reason = validate_messages(messages, _worker_state["require_assistant_last"])
        if reason:
            rejected.append((record, f"after cleaning: {reason}"))
        else:
            kept.append(record)
    pii_counts.update(scrubber.counts)
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


def _scrub_rejected(entry: dict[str, Any], scrub: Scrubber) -> dict[str, Any]:
    """A rejected.jsonl entry with every string redacted; a raw line that was not JSON has its escapes undone first."""
    raw = entry.get("record")
    return {**scrub.tree({k: v for k, v in entry.items() if k != "record"}),
            "record": scrub.raw_line(raw) if isinstance(raw, str) else scrub.tree(raw)}


def read_inputs(files: list[Path], cfg: PrepareConfig, manifest: Manifest,
                log: Log) -> tuple[list[Record], list[dict[str, Any]], dict[str, str], int]:
    """Read, size-check, trim and validate every file; returns valid records, rejected entries, the format found per
    file and how many conversations had trailing user turns trimmed."""
    records: list[Record] = []
    rejected: list[dict[str, Any]] = []
    formats: dict[str, str] = {}
    trimmed = 0
    max_bytes = cfg.validate.max_record_bytes
    for path in files:
        fmt = cfg.format or detect_format(path)
        formats[str(path)] = fmt
        manifest.add_input(path, format=fmt)
        read_here = 0
        for item in read_file(path, fmt, cfg.formats, max_bytes):
            read_here += 1
            if isinstance(item, Rejection):
                reason, too_large, trimmed_turns = item.reason, False, 0
            else:
                reason = size_problem(item, max_bytes)
                too_large, trimmed_turns = reason is not None, 0
                if not too_large:
                    item, trimmed_turns, reason = check_record(item, cfg.validate, cfg.require_assistant_last)
            if reason and cfg.strict:
                line = item.line if isinstance(item, Rejection) else item["meta"]["source"].rpartition(":")[2]
                raise StrictModeError(f"{path}:{line}: {reason}")
            if isinstance(item, Rejection):
                rejected.append(item.to_json())
            elif reason:
                rejected.append(_rejected_record(item, reason, with_content=not too_large))
            else:
                records.append(item)
                trimmed += trimmed_turns > 0
        log(f"read {read_here} records from {path} ({fmt})")
    return records, rejected, formats, trimmed


def prepare(inputs: list[Path], out: Path, cfg: PrepareConfig, log: Log = lambda _msg: None) -> PrepareReport:
    """Run the whole prepare stage; writes the dataset files, card and manifest into `out` (all or nothing).

    Raises InputError / StrictModeError with a one-line message naming the file (and line), redacted too.
    """
    scrub = _make_scrubber(cfg.pii)
    try:
        return _prepare(inputs, out, cfg, scrub, scrub.log(log))
    except (InputError, StrictModeError) as exc:
        raise type(exc)(scrub.text(str(exc))) from None


def _prepare(inputs: list[Path], out: Path, cfg: PrepareConfig, scrub: Scrubber, log: Log) -> PrepareReport:
    manifest = Manifest.start("prepare", config=scrub.tree(cfg.model_dump(mode="json")))
    files = expand_inputs(inputs)
    with manifest.timed("read_validate"):
        records, rejected, formats, trimmed = read_inputs(files, cfg, manifest, log)
    counts: dict[str, Any] = {"read": len(records) + len(rejected), "invalid": len(rejected), "trimmed": trimmed}
    log(f"{counts['read']} records read, {len(rejected)} invalid, {trimmed} with trailing user turns trimmed")

    with manifest.timed("clean_redact"):
        records, cleaned_out, pii_counts, changed = clean_and_redact(records, cfg)
    rejected.extend(_rejected_record(record, reason) for record, reason in cleaned_out)
    counts |= {"messages_changed_by_cleaning": changed, "empty_after_cleaning": len(cleaned_out)}
    log(f"cleaned {changed} messages; PII replaced: {dict(pii_counts) or 'none'}")

    with manifest.timed("dedup"):
        records, duplicates = deduplicate(records, cfg.dedup)
    counts["duplicates"] = len(duplicates)
    log(f"{len(duplicates)} duplicates removed")

    with manifest.timed("fit"):
        records, fit_dropped, fit_info = fit_to_context(records, cfg.fit, log)
    rejected.extend(_rejected_record(record, reason) for record, reason in fit_dropped)
    dropped_pieces = [_rejected_record(piece, f"a piece of a kept conversation: {reason}")
                      for piece, reason in fit_info.pop("dropped_pieces", [])]
    counts["dropped_over_max_tokens"] = len(fit_dropped)
    counts["pieces_dropped"] = len(dropped_pieces)

    with manifest.timed("balance"):
        records, capped, capped_pieces, balance_info = balance_cap(records, cfg.balance)
    rejected.extend(_rejected_record(record, reason) for record, reason in capped)
    dropped_pieces += [_rejected_record(piece, f"a further piece of a conversation capped by balance: {reason}")
                       for piece, reason in capped_pieces]
    counts |= {"capped_by_balance": len(capped), "pieces_capped": len(capped_pieces)}

    with manifest.timed("split"):
        train, val, test = split(records, cfg.split)
    kept_sources = {group_key(r) for r in records}
    counts |= {"kept": len(kept_sources), "rejected": len(rejected)}
    for name, part in (("train", train), ("val", val), ("test", test)):
        counts[f"{name}_sources"] = len({group_key(r) for r in part})
    if counts["read"] != counts["kept"] + counts["rejected"] + counts["duplicates"]:
        raise RuntimeError(f"record accounting does not add up: {counts}")  # a bug in chatforge, never user error

    with manifest.timed("augment"):
        upsampled, balance_info = balance_upsample(train, cfg.balance, balance_info)
        augmented = augment_train(train, cfg.augment)
    train = train + upsampled + augmented
    counts |= {"train": len(train), "val": len(val), "test": len(test), "upsampled": len(upsampled),
               "augmented": len(augmented), "pieces_from_long_conversations": fit_info.get("pieces_added", 0)}

    rejected = [_scrub_rejected(entry, scrub) for entry in rejected + dropped_pieces]
    for entry in manifest.inputs:
        entry["path"] = scrub.text(entry["path"])
    formats = {scrub.text(path): fmt for path, fmt in formats.items()}
    with staged_output(out) as staging, manifest.timed("write"):
        for name, part in (("train", train), ("val", val), ("test", test), ("rejected", rejected), ("duplicates", duplicates)):
            write_jsonl(staging / f"{name}.jsonl", part)
        card = write_card(staging, counts=counts, formats=formats, pii_counts=dict(pii_counts), fit_info=fit_info,
                          balance_info=scrub.tree(balance_info), cfg=cfg, rejected=rejected)
        manifest.counts = counts
        manifest.outputs = {name: f"{name}.jsonl" for name in ("train", "val", "test", "rejected", "duplicates")}
        manifest.outputs |= {"card": "card.md", "card_json": "card.json", "token_histogram": "token_lengths.png"}
        manifest.extra["pii_counts"] = dict(pii_counts)
        manifest.write(staging)
    log(f"wrote {out}")
    return PrepareReport(out_dir=out, counts=counts, card=card)
