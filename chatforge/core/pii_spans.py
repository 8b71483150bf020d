"""What the PII detectors share: a hit (`Span`), which type wins an overlap, and whether a match stands alone.

Use it like this (as the detectors in `pii_identifiers` and `pii_secrets` do)::

    match = _SSN.match(text, pos)
    if match and isolated(text, pos, match.end(), glue="-./"):   # not glued to a letter or another number
        return one_span(pos, match.end(), "SSN")                 # [(pos, end, 'SSN', PRIORITY['SSN'])]
"""

from __future__ import annotations

import re

Span = tuple[int, int, str, int]  # start, end, type, priority (lower wins an overlap)

PRIORITY = {"URL_CREDENTIALS": 0, "API_KEY": 1, "EMAIL": 2, "IBAN": 3, "CREDIT_CARD": 4, "SSN": 5, "IP_ADDRESS": 6,
            "PHONE": 7, "extra": 8, "random token": 9}

_GROUP_BEFORE = re.compile(r"(?:^| )(?=[A-Z]*[0-9])[A-Z0-9]{4} $")  # '3704 ' in 'DE89 3704 0044'


def one_span(start: int, end: int, kind: str, priority: str | None = None) -> list[Span]:
    """One hit as a list (what detectors return): its priority is `kind`'s, or `priority`'s ('random token')."""
    return [(start, end, kind, PRIORITY[priority or kind])]


def isolated(text: str, start: int, end: int, glue: str, grouped: bool = False) -> bool:
    """True when text[start:end] touches no word character, nor another number through one of the `glue` chars.

    With `grouped`, '0044' in 'DE89 3704 0044 ...' is not isolated either: it is a group inside a longer number.
    """
    return free_before(text, start, glue, grouped) and free_after(text, end, glue)


def free_before(text: str, start: int, glue: str, grouped: bool = False) -> bool:
    """The left half of `isolated`: nothing glued to text[start] from before."""
    if start > 0:
        before = text[start - 1]
        if before.isalnum() or before == "_" or (before in glue and start > 1 and text[start - 2].isdigit()):
            return False
        if grouped and before == " " and _GROUP_BEFORE.search(text, max(0, start - 6), start):
            return False
    return True


def free_after(text: str, end: int, glue: str) -> bool:
    """The right half of `isolated`: nothing glued to text[end - 1] from after."""
    if end < len(text):
        after = text[end]
        if after.isalnum() or after == "_" or (after in glue and end + 1 < len(text) and text[end + 1].isdigit()):
            return False
    return True
