"""Count a conversation's tokens as its chat template renders it, without rendering it: what `fit` measures with.

Use it like this::

    costs = measure_template_costs(tokenizer)            # the template's own tokens per role, measured once
    counter = ContentCounter(tokenizer, costs.trims)
    content_tokens = counter.count_all(records)          # per record, per message: tokens of the content
    messages, counts = records[0]["messages"], content_tokens[0]
    total = costs.conversation + sum(costs.message_cost(m, i, n) for i, (m, n) in enumerate(zip(messages, counts)))
    prefix, tokens = counter.cut(answer, max_tokens=100)  # the longest prefix that fits, and its tokens

Counting is fast because no conversation is rendered: the distinct message contents are tokenised in batches and
the template's own tokens (turn headers, bos, end-of-turn) are measured once per role by rendering a conversation
with placeholder contents (`measure_template_costs`). That is exact whenever the tokenizer does not merge a
message's first or last characters with the template text around them: true for byte-level BPEs that split on
whitespace and, as tested, for Gemma's tokenizer. For SentencePiece-style BPEs such as Gemma's, which otherwise run
BPE over whole lines, distinct words are tokenised once each (`_SpaceWordCounter`, provably exact).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from chatforge.core.records import Message, Record

ENCODE_CHUNK = 4096  # texts per encode_batch call: keeps the Encoding objects of a 40 MB corpus out of memory


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


class ContentCounter:
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
        cached = Tokenizer.from_str(backend.to_str())
        cached.no_truncation()
        cached.no_padding()
        tokenizer._chatforge_plain_backend = cached
    return cached
