"""Fit conversations to the model's context: count tokens as the chat template renders them; split, cut or drop.

Use it like this::

    tokenizer = load_tokenizer(cfg.fit.model, cfg.fit.chat_template)
    result = fit_records(records, tokenizer, cfg.fit)        # FitConfig(max_tokens=1024, overflow="split")
    result.records, result.dropped, token_stats(result.token_counts)

Counting is fast because no conversation is rendered: the distinct message contents are tokenised in batches and
the template's own tokens (turn headers, bos, end-of-turn) are measured once per role by rendering a conversation
with placeholder contents (`measure_template_costs`). That is exact whenever the tokenizer does not merge a
message's first or last characters with the template text around them: true for byte-level BPEs that split on
whitespace and, as tested, for Gemma's tokenizer. For SentencePiece-style BPEs such as Gemma's, which otherwise run
BPE over whole lines, distinct words are tokenised once each (`_SpaceWordCounter`, provably exact).

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

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatforge.config import FitConfig
from chatforge.core.records import Message, Record
from chatforge.models.templates import ensure_chat_template

MIN_ANSWER_TOKENS = 8
"""An answer cut shorter than this teaches little but to stop early: such an exchange is dropped instead."""

ENCODE_CHUNK = 4096  # texts per encode_batch call: keeps the Encoding objects of a 40 MB corpus out of memory


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


@dataclass(frozen=True)
class TemplateCosts:
    """Tokens a chat template adds around message contents, measured once (see measure_template_costs)."""

    conversation: int  # once per conversation: bos, a default system prompt...
    turn: dict[str, int]  # around one message of each role
    leading_system: int  # around a system message in first position (Gemma folds it into the first user turn)
    trims: bool  # the template strips whitespace around contents

    def message_cost(self, message: Message, position: int, content_tokens: int) -> int:
        role = message.get("role", "user")
        if position == 0 and role == "system":
            return self.leading_system + content_tokens
        return self.turn.get(role, self.turn["user"]) + content_tokens


def fit_records(records: list[Record], tokenizer: Any, cfg: FitConfig) -> FitResult:
    """Count each conversation's tokens under the chat template and handle those over `cfg.max_tokens`.

    The tokenizer gets `cfg.chat_template` (or, lacking a template, one picked by ensure_chat_template). With
    `cfg.enabled` False every record is kept and only counted.
    """
    if cfg.chat_template is not None or not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer, cfg.chat_template)
    costs = measure_template_costs(tokenizer)
    counter = _ContentCounter(tokenizer, costs.trims)
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


def measure_template_costs(tokenizer: Any) -> TemplateCosts:
    """Render conversations with placeholder contents and count the tokens of the text around the placeholders."""

    def frame_tokens(roles: str) -> int:
        names = {"s": "system", "u": "user", "a": "assistant"}
        messages = [{"role": names[r], "content": f"\u27e6{i}\u27e7"} for i, r in enumerate(roles)]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        frame = re.split(r"\u27e6\d+\u27e7", rendered)
        if len(frame) != len(roles) + 1:
            raise ValueError(f"the chat template does not render each message's content once ({roles!r})")
        return sum(_encode_lengths(tokenizer, [part for part in frame if part]))

    pair = frame_tokens("ua")
    later_user = frame_tokens("uau") - pair
    later_assistant = frame_tokens("uaua") - frame_tokens("uau")
    try:
        later_system = frame_tokens("uas") - pair
    except Exception:  # templates that refuse a system message after the first turn
        later_system = later_user
    try:
        leading_system = frame_tokens("sua") - pair
    except Exception:  # templates without a system role: count it like a user turn
        leading_system = later_user
    probe = tokenizer.apply_chat_template([{"role": "user", "content": " \u27e6x\u27e7 "}], tokenize=False)
    return TemplateCosts(
        conversation=pair - later_user - later_assistant,
        turn={"system": later_system, "user": later_user, "assistant": later_assistant},
        leading_system=leading_system,
        trims=" \u27e6x\u27e7 " not in probe,
    )


class _ContentCounter:
    """Token counts of message contents as the template writes them (trimmed or not), batched on the fast backend."""

    def __init__(self, tokenizer: Any, trims: bool) -> None:
        self.tokenizer = tokenizer
        self.trims = trims

    def text(self, message: Message) -> str:
        content = str(message.get("content") or "")
        return content.strip() if self.trims else content

    def count_all(self, records: list[Record]) -> list[list[int]]:
        """Per record, per message: content tokens. Identical contents (system prompts) are tokenised once."""
        texts = [self.text(m) for record in records for m in record["messages"]]
        unique = list(dict.fromkeys(texts))
        tokens_of = dict(zip(unique, _encode_lengths(self.tokenizer, unique)))
        flat = iter(map(tokens_of.__getitem__, texts))
        return [[next(flat) for _ in record["messages"]] for record in records]

    def cut(self, text: str, max_tokens: int) -> tuple[str, int]:
        """The longest prefix of `text` (at a token boundary) that tokenises to at most max_tokens; and its count."""
        offsets = _encode_offsets(self.tokenizer, text)
        keep = min(max_tokens, len(offsets))
        while keep > 0:
            prefix = text[: offsets[keep - 1][1]]
            prefix = prefix.strip() if self.trims else prefix
            count = _encode_lengths(self.tokenizer, [prefix])[0]
            if count <= max_tokens:
                return prefix, count
            keep -= 1  # re-tokenising a prefix can cost a token more than the offsets promised
        return "", 0


def _fit_overflow(
    record: Record,
    message_costs: list[int],
    total: int,
    cfg: FitConfig,
    costs: TemplateCosts,
    counter: _ContentCounter,
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
    turns: list[Message], turn_costs: list[int], budget: int, costs: TemplateCosts, counter: _ContentCounter
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


def _encode_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of texts without special tokens added: word-cached on SentencePiece-style BPEs, else batched."""
    backend = _plain_backend(tokenizer)
    if backend is None:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    word_counter = _word_counter(tokenizer, backend)
    if word_counter is not None:
        return word_counter.count(texts)
    return _batch_lengths(backend, texts)


def _batch_lengths(backend: Any, texts: list[str]) -> list[int]:
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    lengths: list[int] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        lengths.extend(len(e) for e in encode(texts[start : start + ENCODE_CHUNK], add_special_tokens=False))
    return lengths


class _SpaceWordCounter:
    """Exact token counts for a BPE whose only preprocessing is spaces -> '▁' (Gemma, SentencePiece conversions).

    Such a tokenizer runs BPE over whole lines (~1 MB/s on Gemma's 262k vocabulary). When no vocabulary entry
    holds a '▁' right after another character, no merge can join a word with the space before the next one, so
    a text's count is the sum of its words' counts (" word" = the word with the spaces before it): each distinct
    word is tokenised once and a 40 MB corpus counts in seconds. Texts holding one of the few entries that do
    cross (Gemma: '>▁</') are tokenised whole.
    """

    def __init__(self, backend: Any, crossing: list[str]) -> None:
        self.backend = backend
        self.crossing = crossing

    def count(self, texts: list[str]) -> list[int]:
        # how each text is counted: by words (the common case), by space-led chunks (runs of spaces), or whole
        crossing = re.compile("|".join(map(re.escape, self.crossing))).search if self.crossing else lambda t: None
        ways = ["whole" if crossing(t) else "chunks" if "  " in t else "words" for t in texts]
        words: set[str] = set()
        first_words: set[str] = set()
        chunks: set[str] = set()
        for text, way in zip(texts, ways):
            if way == "words":
                parts = text.split(" ")
                words.update(parts)
                first_words.add(parts[0])
            elif way == "chunks":
                chunks.update(_SPACE_LED_CHUNK.findall(text))
        word_list, first_list, chunk_list = list(words), list(first_words), list(chunks)
        with_space = dict(zip(word_list, _batch_lengths(self.backend, [" " + w for w in word_list])))
        bare = _batch_lengths(self.backend, first_list)  # a text's first word has no space before it
        first_gain = {w: n - with_space[w] for w, n in zip(first_list, bare)}
        chunk_tokens = dict(zip(chunk_list, _batch_lengths(self.backend, chunk_list)))
        whole = iter(_batch_lengths(self.backend, [t for t, way in zip(texts, ways) if way == "whole"]))
        counts = []
        for text, way in zip(texts, ways):
            if way == "words":
                parts = text.split(" ")
                counts.append(sum(map(with_space.__getitem__, parts)) + first_gain[parts[0]])
            elif way == "chunks":
                counts.append(sum(map(chunk_tokens.__getitem__, _SPACE_LED_CHUNK.findall(text))))
            else:
                counts.append(next(whole))
        return counts


_SPACE_LED_CHUNK = re.compile(" *[^ ]+| +")


def _word_counter(tokenizer: Any, backend: Any) -> _SpaceWordCounter | None:
    """A _SpaceWordCounter when the backend has the shape it is exact for (checked once per tokenizer), else None."""
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    cached = getattr(tokenizer, "_chatforge_word_counter", None)
    if cached is not None and cached[0] == vocab_size:  # tokens added since: check again
        return cached[1] or None
    counter: _SpaceWordCounter | bool = False
    if _is_space_replacing_bpe(backend):
        vocab = backend.get_vocab(with_added_tokens=True)
        crossing = {t.replace("\u2581", " ") for t in vocab if _CROSSES_SPACE.search(t)}
        # added tokens that swallow the spaces next to them also tie neighbouring words together
        crossing |= {a.content for a in backend.get_added_tokens_decoder().values() if a.lstrip or a.rstrip}
        if len(crossing) <= 64:  # more would make the per-text check slow; such a vocabulary is batched instead
            counter = _SpaceWordCounter(backend, sorted(crossing))
    try:
        tokenizer._chatforge_word_counter = (vocab_size, counter)
    except AttributeError:
        pass
    return counter or None


_CROSSES_SPACE = re.compile("[^ \u2581][ \u2581]")


def _is_space_replacing_bpe(backend: Any) -> bool:
    def state(component: Any) -> dict[str, Any] | None:
        return None if component is None else json.loads(component.__getstate__())

    normalizer, pre_tokenizer = state(backend.normalizer), state(backend.pre_tokenizer)
    replaces_spaces = normalizer == {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    # Splitting on " " after the normalizer has replaced every space is a no-op (that is Gemma's setup).
    inert_split = pre_tokenizer is None or (
        pre_tokenizer.get("type") == "Split" and pre_tokenizer.get("pattern") == {"String": " "}
    )
    return type(backend.model).__name__ == "BPE" and replaces_spaces and inert_split


def _encode_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    backend = _plain_backend(tokenizer)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return backend.encode(text, add_special_tokens=False).offsets


def _plain_backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend with truncation and padding off (a copy if they were on), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.truncation is None and backend.padding is None):
        return backend
    cached = getattr(tokenizer, "_chatforge_plain_backend", None)
    if cached is None:
        from tokenizers import Tokenizer

        cached = Tokenizer.from_str(backend.to_str())
        cached.no_truncation()
        cached.no_padding()
        tokenizer._chatforge_plain_backend = cached
    return cached
