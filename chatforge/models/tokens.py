"""Special token ids every stage agrees on.

Use it like this::

    pad_id = pad_token_id(tokenizer)       # what batches are padded with: pad, else eos, else 0

Padded positions are masked (attention mask 0, label ignored), so the id only has to be a real token of the
vocabulary; one rule everywhere means training, eval, the bias probe and generation build identical batches.
"""

from __future__ import annotations

from typing import Any


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
