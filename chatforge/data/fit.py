"""Fit conversations to the model's context: count tokens as the chat template renders them; split, cut or drop.

Use it like this::

    tokenizer = load_tokenizer(cfg.fit.model, cfg.fit.chat_template)
    result = fit_records(records, tokenizer, cfg.fit)        # FitConfig(max_tokens=1024, overflow="split")
    result.records, result.dropped, token_stats(result.token_counts)

Token counts come from `token_counting` (the template's own tokens measured once per role, contents tokenised in
batches; exact, see there).

Overflow, for a conversation over `max_tokens`:
- "split": cut at turn boundaries into pieces that each start with the system message (if any) and a user turn, end
  with an assistant turn and fit; ids `<id>-p1`, `<id>-p2`… with meta.group = <id>, meta.part = k.
- "truncate": keep the leading turns that fit, ending with an assistant turn; meta.truncated = True.
- "drop": move it to `dropped` with the reason.
A single exchange that alone is too long has its (last) answer cut by tokens and meta.truncated = True; if even a
few answer tokens don't fit after the prompt, the exchange is dropped with its reason: the whole record goes to
`dropped` when no piece of it fits, else that piece goes to `dropped_pieces` and the record counts as kept (its
other pieces are in `records`). So every input record is either kept or dropped, never both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatforge.config import FitConfig
from chatforge.core.records import Message, Record
from chatforge.data.token_counting import ContentCounter, TemplateCosts, measure_template_costs
from chatforge.models.templates import ensure_chat_template

MIN_ANSWER_TOKENS = 8
"""An answer cut shorter than this teaches little but to stop early: such an exchange is dropped instead."""


@dataclass
class FitResult:
    """Records that fit (kept, split pieces and truncated records, in input order) and the ones that could not."""

    records: list[Record]
    dropped: list[tuple[Record, str]]  # input records none of which fits, with the reason
    token_counts: list[int]  # per output record, with the chat template
    split_sources: int = 0  # input records split into two or more pieces
    pieces_added: int = 0  # extra records created by splitting: len(records) = kept inputs + pieces_added
    truncated: int = 0  # output records whose content was cut or that lost trailing turns
    dropped_pieces: list[tuple[Record, str]] = field(default_factory=list)  # pieces of kept records that don't fit


def fit_records(records: list[Record], tokenizer: Any, cfg: FitConfig) -> FitResult:
    """Count each conversation's tokens under the chat template and handle those over `cfg.max_tokens`.

    The tokenizer gets `cfg.chat_template` (or, lacking a template, one picked by ensure_chat_template). With
    `cfg.enabled` False every record is kept and only counted.
    """
    if cfg.chat_template is not None or not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer, cfg.chat_template)
    costs = measure_template_costs(tokenizer)
    counter = ContentCounter(tokenizer, costs.trims)
    content_tokens = counter.count_all(records)
    result = FitResult(records=[], dropped=[], token_counts=[])
    for record, tokens in zip(records, content_tokens):
        message_costs = [costs.message_cost(m, i, n) for i, (m, n) in enumerate(zip(record["messages"], tokens))]
        total = costs.conversation + sum(message_costs)
        if total <= cfg.max_tokens or not cfg.enabled:
            result.records.append(record)
            result.token_counts.append(total)
        elif cfg.overflow == "drop":
            result.dropped.append((record, f"{total} tokens > max_tokens {cfg.max_tokens}"))
        else:
            _fit_overflow(record, message_costs, total, cfg, costs, counter, result)
    return result


def token_stats(counts: list[int]) -> dict[str, float]:
    """min, median, p95, max, total and mean of token counts (all 0 for an empty list)."""
    if not counts:
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "total": 0, "mean": 0.0}
    values = np.asarray(counts, dtype=np.int64)
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
        "total": int(values.sum()),
        "mean": float(values.mean()),
    }


def _fit_overflow(
    record: Record,
    message_costs: list[int],
    total: int,
    cfg: FitConfig,
    costs: TemplateCosts,
    counter: ContentCounter,
    result: FitResult,
) -> None:
    """Split or truncate one over-long record into `result` (or drop it there, with the reason)."""
    messages = record["messages"]
    n_prefix = 1 if messages and messages[0].get("role") == "system" else 0
    budget = cfg.max_tokens - costs.conversation - sum(message_costs[:n_prefix])
    if budget <= 0:
        reason = f"system message alone {cfg.max_tokens - budget} tokens > max_tokens {cfg.max_tokens}"
        result.dropped.append((record, reason))
        return
    turns, turn_costs = messages[n_prefix:], message_costs[n_prefix:]
    exchanges = _exchanges(turns)
    if not exchanges:
        result.dropped.append((record, f"{total} tokens > max_tokens {cfg.max_tokens} and no assistant turn"))
        return
    groups = _pack(exchanges, turn_costs, budget)
    if cfg.overflow == "truncate":
        groups = groups[:1]
    pieces: list[tuple[Record, int]] = []
    failures: list[tuple[Record, str]] = []
    for part, (start, end) in enumerate(groups, start=1):
        kept, used, cut = _truncate_to(turns[start:end], turn_costs[start:end], budget, costs, counter)
        piece = _make_piece(record, messages[:n_prefix] + kept, part if len(groups) > 1 else None)
        if not kept:
            reason = f"the prompt leaves no room for {MIN_ANSWER_TOKENS} answer tokens in max_tokens {cfg.max_tokens}"
            failures.append((piece, reason))
            continue
        if cut or cfg.overflow == "truncate" or len(kept) < end - start:
            piece["meta"]["truncated"] = True
            result.truncated += 1
        pieces.append((piece, cfg.max_tokens - budget + used))
    if not pieces:
        result.dropped.append((record, f"{total} tokens > max_tokens {cfg.max_tokens}; {failures[0][1]}"))
        return
    result.dropped_pieces.extend(failures)  # the record itself is kept through its other pieces
    if len(groups) > 1:
        result.split_sources += 1
        result.pieces_added += len(pieces) - 1
    for piece, tokens in pieces:
        result.records.append(piece)
        result.token_counts.append(tokens)


def _exchanges(turns: list[Message]) -> list[tuple[int, int]]:
    """(start, end) of each exchange: cut before every user turn that follows an assistant turn; each exchange ends
    with its last assistant turn (turns after it with no answer are left out)."""
    exchanges: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(turns) + 1):
        if i < len(turns) and not (turns[i].get("role") == "user" and turns[i - 1].get("role") == "assistant"):
            continue
        end = i
        while end > start and turns[end - 1].get("role") != "assistant":
            end -= 1
        if end > start:
            exchanges.append((start, end))
        start = i
    return exchanges


def _pack(exchanges: list[tuple[int, int]], costs: list[int], budget: int) -> list[tuple[int, int]]:
    """Greedily join consecutive exchanges into (start, end) groups that fit the budget (a lone one may not)."""
    groups: list[tuple[int, int]] = []
    used = 0
    for start, end in exchanges:
        cost = sum(costs[start:end])
        if groups and used + cost <= budget:
            groups[-1] = (groups[-1][0], end)
            used += cost
        else:
            groups.append((start, end))
            used = cost
    return groups


def _truncate_to(
    turns: list[Message], turn_costs: list[int], budget: int, costs: TemplateCosts, counter: ContentCounter
) -> tuple[list[Message], int, bool]:
    """The turns that fit `budget`, ending with an assistant turn, cutting the last answer by tokens if needed.

    Returns (turns, tokens used, whether an answer was cut); no turns when not even a short answer fits.
    """
    kept: list[Message] = []
    used = 0
    last_answer_end, used_at_answer = 0, 0
    for message, cost in zip(turns, turn_costs):
        if used + cost <= budget:
            kept.append(message)
            used += cost
            if message.get("role") == "assistant":
                last_answer_end, used_at_answer = len(kept), used
            continue
        room = budget - used - costs.turn["assistant"]
        if message.get("role") == "assistant" and room >= MIN_ANSWER_TOKENS:
            text, tokens = counter.cut(counter.text(message), room)
            if tokens >= MIN_ANSWER_TOKENS:
                kept.append({**message, "content": text})
                return kept, used + costs.turn["assistant"] + tokens, True
        break
    return kept[:last_answer_end], used_at_answer, False


def _make_piece(record: Record, messages: list[Message], part: int | None) -> Record:
    """A new record with `messages`; a split piece gets id '<id>-p<part>' and meta group/part."""
    meta = dict(record.get("meta") or {})
    piece: Record = {"id": record["id"], "messages": messages, "meta": meta}
    if part is not None:
        piece["id"] = f"{record['id']}-p{part}"
        meta["group"], meta["part"] = record["id"], part
    if "weight" in record:
        piece["weight"] = record["weight"]
    return piece
