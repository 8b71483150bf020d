"""The registry of PII detectors, and the one scan for digit seeds that most of them share.

Use it through `chatforge.core.pii.Redactor`, which runs `digit_seeded_spans` with the validators and `SCANNERS` of
the types it was asked for; or call a detector directly::

    DETECTORS["CREDIT_CARD at digit seeds"]("card 4111 1111 1111 1111")   # [(5, 24, 'CREDIT_CARD', 4)]

The detectors live by what they find: personal identifiers (cards, SSNs, IPs, phones, IBANs, e-mails) in
`pii_identifiers`, secrets (API keys, tokens, URL passwords) in `pii_secrets`, and what they share (spans,
priorities, isolation checks) in `pii_spans`. The matching rules are listed in the docstring of `chatforge.core.pii`.

`DETECTORS` lists every detector as a whole-text function (text -> spans), by name; the Redactor runs the same
functions, and tests/data/test_linear_time.py times each of them on adversarial text. Every detector is linear in
the text's length: each regex either matches a bounded length at a seed, or consumes what it scans; no validator
looks further than a bounded window around a seed, and runs (tokens, IPv6 candidates) are judged once each.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from chatforge.config import PII_TYPES
from chatforge.core.pii_identifiers import (
    at_sign_email_spans,
    card_at,
    iban_at,
    ipv4_at,
    ipv6_spans,
    paren_phone_spans,
    phone_at,
    plus_phone_spans,
    ssn_at,
)
from chatforge.core.pii_secrets import at_sign_url_credential_spans, key_spans_at, unseeded_key_spans
from chatforge.core.pii_spans import Span

DEFAULT_TYPES = frozenset(t for t in PII_TYPES if t != "PERSON")

# One leading character class and no top-level alternation, or the regex engine tries every position.
_DIGIT_SEED = re.compile(
    r"[0-9](?:"
    r"(?<![A-Za-z0-9_][0-9])(?:"  # a number starts here:
    r"[0-9]{2}-[0-9]{2}-"  # 123-45-6789
    r"|[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]"  # 10.0.0.1
    r"|[0-9]{3}[ \-]?[0-9]{4}"  # 4111 1111 ...
    r"|[0-9]{2}[ .\-][0-9]{3}[ .\-][0-9]"  # 202.555.0143
    r"|[ .\-][2-9][0-9]{2}[ .\-]"  # 1-800-...
    r"|(?<=0)0?[1-9][0-9])"  # 0044 ..., 020 ...
    r"|(?<=[A-Za-z]{2}[0-9])[0-9]"  # GB82 ... (IBAN check digits)
    r"|(?<=[A-Za-z0-9_\-+/]{11})|(?=[A-Za-z0-9_\-+/]{10})"  # a digit inside a long token
    r")"
)


SeededMatcher = Callable[[str, int], list[Span]]
Scanner = Callable[[str], list[Span]]

DIGIT_MATCHERS: tuple[tuple[str, SeededMatcher], ...] = (
    ("CREDIT_CARD", card_at), ("SSN", ssn_at), ("IP_ADDRESS", ipv4_at), ("PHONE", phone_at), ("IBAN", iban_at),
)
"""Validators run at each digit seed (one shared scan finds the seeds), by the type they find."""
AFTER_LETTER_MATCHERS = frozenset({iban_at})
"""The only validators that can match at a digit right after a letter (GB82...): the others need a number to start
there, so in a long run of letters and digits they are not even called."""

SCANNERS: tuple[tuple[str, Scanner], ...] = (
    ("PHONE", plus_phone_spans), ("PHONE", paren_phone_spans), ("IP_ADDRESS", ipv6_spans),
    ("EMAIL", at_sign_email_spans), ("URL_CREDENTIALS", at_sign_url_credential_spans),
    ("API_KEY", unseeded_key_spans),
)
"""Detectors that scan the whole text themselves, by the type they find."""


def digit_seeded_spans(text: str, matchers: tuple[SeededMatcher, ...], keys: bool) -> list[Span]:
    """Run `matchers` at every digit seed, and with `keys` judge each token holding a digit as a possible API key."""
    spans: list[Span] = []
    token_end = -1  # digits inside a token already judged are skipped
    after_letter = tuple(matcher for matcher in matchers if matcher in AFTER_LETTER_MATCHERS)
    seed = _DIGIT_SEED.search(text)
    while seed is not None:
        at = seed.start()
        before = text[at - 1] if at else " "
        if not (before.isalnum() or before == "_"):
            for matcher in matchers:
                spans += matcher(text, at)
        elif after_letter and before.isalpha():
            for matcher in after_letter:
                spans += matcher(text, at)
        if keys and at >= token_end:
            found, token_end = key_spans_at(text, at)
            spans += found
        seed = _DIGIT_SEED.search(text, at + 1)
    return spans


DETECTORS: dict[str, Scanner] = {
    **{f"{kind} at digit seeds": partial(digit_seeded_spans, matchers=(matcher,), keys=False)
       for kind, matcher in DIGIT_MATCHERS},
    "API_KEY at digit seeds": partial(digit_seeded_spans, matchers=(), keys=True),
    **{f"{kind} by {scanner.__name__.strip('_')}": scanner for kind, scanner in SCANNERS},
}
"""Every built-in detector as a whole-text function, by name (what the linear-time test checks)."""
