"""Answers-only loss masks for any chat template: which tokens of a rendered conversation carry loss.

Use it like this::

    masked = answer_token_mask(tokenizer, messages)     # ids as apply_chat_template(tokenize=True) gives them
    masked.input_ids, masked.mask                       # mask: 1 on each answer and its end-of-turn marker
    masked.method                                       # "markers", "spans" or "last_turn" (see below)
    has_generation_markers(tokenizer.chat_template)     # True: transformers' return_assistant_tokens_mask is used

A template with `{% generation %}` markers (chatforge's own, see templates.py) says itself which text is the
answer. Most hub templates (Qwen, Llama 3, Mistral, Gemma, Phi-3, SmolLM, Zephyr) have none, so each assistant
turn's characters are found by rendering the conversation prefix by prefix:

- the answer starts where `render(messages[:i], add_generation_prompt=True)` stops matching the full rendering;
- it ends where `render(messages[:i + 1])` stops matching it (for the last turn: where the rendering with one
  more user message stops matching), cut right after the last special token in the turn (`<|im_end|>`,
  `<|eot_id|>`, `</s>`, `<end_of_turn>`...): the answer and the end-of-turn marker carry loss, the newline the
  template writes before the next turn does not;
- characters map to tokens through the fast tokenizer's offsets (a token overlapping the span is trained, as in
  transformers' own marker path).

A template that rewrites earlier turns once a later turn exists (one that strips `<think>` reasoning from earlier
answers, or moves the system prompt to the last user turn) renders an earlier answer differently from how the
model saw it when it wrote it. Such a conversation is trained on its last assistant turn only, rendered exactly as
at inference (method "last_turn"), and a warning says so once per template. Rendering costs two template renders
per assistant turn.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

logger = logging.getLogger(__name__)

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE_USER_TURN = "\u27e6next question\u27e7"  # appended to find where the last turn's end-of-turn marker stops
_warned_templates: set[int] = set()


@dataclass
class MaskedConversation:
    """A conversation rendered and tokenised, with 1 on every token that carries loss."""

    input_ids: list[int]
    mask: list[int]
    method: str  # "markers" | "spans" | "last_turn"


def template_text(tokenizer: Any) -> str:
    """The tokenizer's default chat template as text ('' when it has none)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: apply_chat_template uses "default"
        template = template.get("default", "")
    return str(template)


def has_generation_markers(template: str | None) -> bool:
    """True when the template wraps answers in `{% generation %}` ... `{% endgeneration %}`."""
    return bool(template) and GENERATION_MARKER.search(template) is not None


def answer_token_mask(tokenizer: Any, messages: Sequence[dict[str, str]]) -> MaskedConversation:
    """Token ids of `messages` in the tokenizer's chat template and the answers-only mask (module docstring)."""
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if has_generation_markers(template_text(tokenizer)):
        encoded = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return MaskedConversation(list(encoded["input_ids"]), list(encoded["assistant_masks"]), "markers")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__}: answers-only masks for a template without {{% generation %}} "
                         "markers need a fast tokenizer (character offsets); use train_on 'all' or a fast tokenizer")
    text, spans, method = answer_spans(tokenizer, chat)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    special_ids = special_token_ids(tokenizer)
    token_starts = [token_start for token_start, _ in offsets]
    trimmed = [_cut_after_turn_marker(text, input_ids, offsets, token_starts, special_ids, span) for span in spans]
    return MaskedConversation(input_ids, spans_to_mask(offsets, trimmed), method)


def answer_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], str]:
    """(rendered text, character span of each trained turn, method) for a template without markers; a span runs
    from the answer's first character to the start of the next turn (see _cut_after_turn_marker)."""
    full = _render(tokenizer, messages, generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return full, [], "spans"
    spans = []
    for index in turns:
        start = _common_prefix_length(_prompt(tokenizer, messages[:index]), full)
        if index == len(messages) - 1:
            end = _last_turn_end(tokenizer, messages, full, start)
        else:
            end = _common_prefix_length(_render(tokenizer, messages[: index + 1], generation_prompt=False), full)
        if not _answer_within(full[start:end], messages[index]["content"]):
            return _last_turn_only(tokenizer, messages[: turns[-1] + 1])
        spans.append((start, end))
    return full, spans, "spans"


def spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span (spans and offsets in order: one pass)."""
    mask = [0] * len(offsets)
    span_index = 0
    for token_index, (token_start, token_end) in enumerate(offsets):
        while span_index < len(spans) and token_start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if token_end > spans[span_index][0] or (token_start == token_end and token_start >= spans[span_index][0]):
            mask[token_index] = 1
    return mask


def _last_turn_only(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], str]:
    """The conversation up to its last answer, rendered as at inference, with only that answer trained."""
    template = template_text(tokenizer)
    if hash(template) not in _warned_templates:
        _warned_templates.add(hash(template))
        logger.warning("the chat template rewrites earlier turns once a later one exists (e.g. drops reasoning from "
                       "earlier answers): each conversation is trained on its last assistant turn only")
    text = _render(tokenizer, messages, generation_prompt=False)
    start = _common_prefix_length(_prompt(tokenizer, messages[:-1]), text)
    end = _last_turn_end(tokenizer, messages, text, start)
    return text, [(start, end)], "last_turn"


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def _prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """What the model is given before it writes the next answer ('' when a template cannot render no messages)."""
    try:
        return _render(tokenizer, messages, generation_prompt=True)
    except (TemplateError, IndexError, KeyError, TypeError, ValueError):
        if messages:
            raise
        return ""  # an answer with nothing before it: templates reading messages[0] fail on []


def _last_turn_end(tokenizer: Any, messages: list[dict[str, str]], text: str, start: int) -> int:
    """Where the final answer's turn ends: where rendering one more user turn departs from `text`. Text a template
    writes only at the very end (Phi-3's eos) is thereby left out; if the probe fails, the end of the text."""
    try:
        probe = _render(tokenizer, [*messages, {"role": "user", "content": PROBE_USER_TURN}], generation_prompt=False)
    except (TemplateError, IndexError, KeyError, TypeError, ValueError):
        return len(text)
    end = _common_prefix_length(probe, text)
    return end if end > start else len(text)


def _common_prefix_length(first: str, second: str) -> int:
    """Length of the longest common prefix (bisection over C-speed slice comparisons)."""
    low, high = 0, min(len(first), len(second))
    if first[:high] == second[:high]:
        return high
    while high - low > 1:  # first[:low] == second[:low] and first[:high] != second[:high]
        middle = (low + high) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle
    return low


def _answer_within(segment: str, content: str) -> bool:
    """The answer's text (trimmed, as many templates trim it) appears in the span found for it."""
    return content.strip() in segment


def _cut_after_turn_marker(
    text: str, input_ids: list[int], offsets: list[tuple[int, int]], token_starts: list[int], special_ids: set[int],
    span: tuple[int, int],
) -> tuple[int, int]:
    """`span` shortened to stop right after its last special token (<|im_end|>, <|eot_id|>, </s>...) when only
    whitespace follows it: the newline a template writes between turns is not the model's to write. Without a
    special token in the turn, its trailing whitespace goes."""
    start, end = span
    straddling = bisect_left(token_starts, end) - 1
    if straddling >= 0 and offsets[straddling][1] > end and offsets[straddling][0] >= start:
        end = offsets[straddling][0]  # the renderings part inside a token ('<|' of '<|user|>'): it is not the turn's
    marker_end = -1
    for index in range(bisect_left(token_starts, start), len(input_ids)):
        if token_starts[index] >= end:
            break
        if input_ids[index] in special_ids:
            marker_end = offsets[index][1]
    if marker_end < 0:
        return start, start + len(text[start:end].rstrip())
    if not text[marker_end:end].strip():
        return start, marker_end
    return start, end


_special_ids_cache: dict[int, tuple[int, set[int]]] = {}


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the special tokens (eos, bos and added special tokens such as <|im_end|> or <|eot_id|>)."""
    cached = _special_ids_cache.get(id(tokenizer))
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    _special_ids_cache[id(tokenizer)] = (len(tokenizer), ids)
    return ids
