"""Adversarial text for linear-time checks: short patterns that make naive regexes and scans backtrack or rescan.

Use it like this::

    for name, text in adversarial_texts(100_000).items():     # each pattern repeated to exactly 100,000 chars
        time_it(lambda: redactor.redact(text))

Each pattern targets a way a detector or cleaning step could go super-linear: a seed found at every repetition
whose validator then reads to the end of the text (digit groups, dotted numbers), an opening that a lazy `.*?`
searches a closing for (unclosed tags and comments), a walk back or forward over a run from every position in it
(tokens, IPv6 candidates, e-mail local parts), lookaheads rescanning a token, and nested quantifiers. Add a
pattern here when you write a new detector or step; every registered one is timed on every pattern.
"""

from __future__ import annotations

import random

PATTERNS: dict[str, str] = {
    "digit groups": "4111 ",
    "digit dash groups": "4111-",
    "digit run": "7",
    "ssn-like": "123-45-",
    "dotted digits": "1.2.",
    "dotted octets": "10.0.0.",
    "phone-like": "+44 20 ",
    "plus signs": "+1",
    "bracketed area codes": "(202) ",
    "iban-like groups": "GB82 ",
    "colons": ":",
    "hex and colons": "a1:",
    "double colons": "1::",
    "at signs": "@",
    "local parts": "a.b@",
    "domains": "@a.b",
    "scheme separators": "a://b:c",
    "bearer words": "Bearer ",
    "aws prefixes": "AKIA",
    "sk prefixes": "sk-",
    "jwt starts": "eyJ",
    "unclosed script": "<script>",
    "unclosed style with attribute": "<style a>",
    "unclosed style tag": "<style a",
    "unclosed comment": "<!--",
    "tag starts": "<a",
    "tag with attributes": "<a x=1 ",
    "unclosed attribute quote": '<a x="',
    "entities without semicolon": "&amp",
    "numeric entities": "&#1",
    "punctuation runs": "!?",
    "dots": ".",
    "commas": ",",
    "sentences": "a. ",
    "sentences without spaces": "a.\n",
    "spaces": " ",
    "tabs and spaces": " \t",
    "blank lines": "\n\n",
    "zero-width and ligatures": "\u200b\ufb01",
    "long lowercase word": "abcdefghij",
}


def base64ish(size: int, seed: int = 0) -> str:
    """A token of random base64 characters with digits, no spaces: the worst case for API-key scanning."""
    rng = random.Random(seed)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
    return "".join(rng.choice(alphabet) for _ in range(size))


def adversarial_texts(size: int) -> dict[str, str]:
    """Every pattern repeated and cut to exactly `size` characters, plus a long base64-ish token and a 'sk-' token."""
    texts = {name: (pattern * (size // len(pattern) + 1))[:size] for name, pattern in PATTERNS.items()}
    texts["base64-ish token"] = base64ish(size)
    texts["sk- token with a digit at the end"] = ("sk-" * size)[: size - 1] + "1"
    texts["digits then letters token"] = ("1a" * size)[:size]
    return texts
