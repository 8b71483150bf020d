"""Incremental detokenisation: the text of a growing answer, one token at a time, without re-decoding the answer.

Use it like this::

    decoder = TextDecoder(tokenizer)
    for token_id in token_ids:
        piece = decoder.push(token_id)     # new settled text ("" while a multi-byte character is incomplete)
    decoder.flush()                        # whatever is left at the end (maybe a U+FFFD for a cut character)
    decoder.text                           # == tokenizer.decode(token_ids, skip_special_tokens=True)

Each push decodes only a short window: the tokens since the last settled piece plus the few before them (so a
SentencePiece word start or a byte-level space decodes as it does in context), the approach of TGI and vLLM. The
window is capped at `MAX_WINDOW` tokens, so a run of tokens that never form a whole character (or only special
tokens) cannot make a step cost grow with the answer.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
MAX_WINDOW = 16  # tokens decoded per push at most (besides the context tokens before them)


class TextDecoder:
    """The settled text of pushed tokens; see the module docstring."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # context tokens start here
        self._read_offset = 0  # tokens up to here are in `text`

    def push(self, token_id: int) -> str:
        """Add one token; return the text it settles (maybe "" now and more with a later token)."""
        self.token_ids.append(token_id)
        return self._settle(force=len(self.token_ids) - self._read_offset >= MAX_WINDOW)

    def flush(self) -> str:
        """Settle whatever is left (a character cut short decodes as U+FFFD); call once the answer has ended."""
        return self._settle(force=True)

    def _settle(self, force: bool) -> str:
        if self._read_offset == len(self.token_ids):
            return ""
        decode = self.tokenizer.decode
        context = decode(self.token_ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        window = decode(self.token_ids[self._prefix_offset:], skip_special_tokens=True)
        if not force and (len(window) <= len(context) or window.endswith(REPLACEMENT_CHAR)):
            return ""
        piece = window[len(context):]
        self._prefix_offset = max(self._read_offset, len(self.token_ids) - MAX_WINDOW)
        self._read_offset = len(self.token_ids)
        self.text += piece
        return piece
