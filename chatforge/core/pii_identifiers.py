"""Detectors of personal identifiers: payment cards, SSNs, IPv4/IPv6 addresses, phone numbers, IBANs, e-mails.

Use them through `chatforge.core.pii.Redactor` (or the `pii_detectors.DETECTORS` registry); each `x_at(text, pos)`
validates what starts at a digit seed found by `pii_detectors`' shared scan and returns spans
`(start, end, TYPE, priority)` (Luhn, mod-97, `ipaddress`, ...); each `x_spans(text)` scans the whole text from
its own literal seed ('+', '(', ':', '@'). Every one is linear in the text's length: bounded matches at seeds,
and runs (IPv6 candidates, e-mail local parts) judged once each.
"""

from __future__ import annotations

import ipaddress
import re

from chatforge.core.pii_spans import Span, free_after, free_before, isolated, one_span

_CARD = re.compile(r"[2-9][0-9]{2,18}(?:([ \-])[0-9]{3,8}(?:\1[0-9]{3,8}){0,4})?")
_LUHN_DOUBLED = str.maketrans("0123456789", "0246813579")  # a digit doubled, minus 9 when over 9


def _luhn_ok(digits: str) -> bool:
    backwards = digits[::-1]
    checked = backwards[0::2] + backwards[1::2].translate(_LUHN_DOUBLED)
    return (sum(checked.encode()) - 48 * len(checked)) % 10 == 0


def card_at(text: str, pos: int) -> list[Span]:
    match = _CARD.match(text, pos)
    if match is None or not free_before(text, pos, ".", grouped=True):
        return []
    groups = match.group().split(match.group(1)) if match.group(1) else [match.group()]
    for kept in range(len(groups), 0, -1):  # "4111 1111 1111 1111 12/27": drop trailing groups until valid
        digits = "".join(groups[:kept])
        if len(digits) < 13:
            break
        if len(digits) <= 19 and _luhn_ok(digits):
            end = pos + len(digits) + kept - 1
            return one_span(pos, end, "CREDIT_CARD") if free_after(text, end, ".") else []
    return []


_SSN = re.compile(r"([0-9]{3})-([0-9]{2})-([0-9]{4})")


def ssn_at(text: str, pos: int) -> list[Span]:
    match = _SSN.match(text, pos)
    if match is None or not isolated(text, pos, match.end(), "-./"):
        return []
    area, group, serial = match.groups()
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return []
    return one_span(pos, match.end(), "SSN")


_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver\.?|release|build|v)|[<>~!=]=)\s*$", re.IGNORECASE)


def ipv4_at(text: str, pos: int) -> list[Span]:
    match = _IPV4.match(text, pos)
    if match is None or not isolated(text, pos, match.end(), ".") or _VERSION_BEFORE.search(text, pos - 12, pos):
        return []
    try:
        address = ipaddress.IPv4Address(match.group())  # rejects 999.1.1.1 and leading zeros
    except ValueError:
        return []
    if address.is_loopback or address.is_unspecified or _is_netmask(match.group()):
        return []  # 127.0.0.1, 0.0.0.0 and 255.255.255.0 identify nothing
    return one_span(pos, match.end(), "IP_ADDRESS")


def _is_netmask(address: str) -> bool:
    bits = "".join(f"{int(octet):08b}" for octet in address.split("."))
    return bits.startswith("1") and "01" not in bits


MAX_IPV6_LENGTH = 45  # 'ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255'
_HEX_OR_COLON = frozenset("0123456789abcdefABCDEF:")
_IPV6_TAIL = re.compile(r"[0-9A-Fa-f:.]*")


def _ipv6_at(text: str, pos: int) -> tuple[list[Span], int]:
    """An IPv6 address in the run of hex digits, colons and dots around the ':' at `pos`, and where the run ends."""
    start = pos
    while start > 0 and text[start - 1] in _HEX_OR_COLON:
        start -= 1
    run_end = _IPV6_TAIL.match(text, pos).end()
    candidate = text[start:run_end].rstrip(".")
    if candidate.endswith(":") and not candidate.endswith("::"):
        candidate = candidate[:-1]
    end = start + len(candidate)
    if (len(candidate) > MAX_IPV6_LENGTH or not any(char.isdigit() for char in candidate)
            or sum(1 for group in candidate.split(":") if group) < 2):
        return [], run_end  # "::1", "std::vector" and friends
    try:
        ipaddress.IPv6Address(candidate)  # rejects times (12:30:45) and MAC addresses
    except ValueError:
        return [], run_end
    return (one_span(start, end, "IP_ADDRESS") if isolated(text, start, end, "") else []), run_end


_PHONE = re.compile(
    r"(?:\+|00)[1-9][0-9]{0,3}(?:[ .\-]?\(0?[0-9]{1,4}\))?(?:[ .\-]?[0-9]{1,5}){1,6}"  # +44 20 7946 0958
    r"|(?:1[ .\-])?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .\-])[0-9]{3}[ .\-][0-9]{4}"  # (202) 555-0143
    r"|0[1-9][0-9]{1,4}[ .\-][0-9]{2,4}(?:[ .\-]?[0-9]{2,4}){1,3}"  # 020 7946 0958
)
_DIGIT_RUN = re.compile(r"[0-9]+")
_DATE_LIKE = re.compile(r"\+?[0-9]{4}[\-./][0-9]{1,2}[\-./][0-9]{1,2}")


def phone_at(text: str, pos: int) -> list[Span]:
    match = _PHONE.match(text, pos)
    if match is None:
        return []
    groups = [(pos + run.start(), pos + run.end()) for run in _DIGIT_RUN.finditer(match.group())]
    digits = sum(end - start for start, end in groups) - (2 if match.group().startswith("00") else 0)
    while digits > 15 and len(groups) > 2:  # a number written right after the phone, e.g. a year
        start, end = groups.pop()
        digits -= end - start
    end = groups[-1][1]
    if not (8 if len(groups) > 1 else 10) <= digits <= 15 or _DATE_LIKE.fullmatch(text, pos, end):
        return []
    return one_span(pos, end, "PHONE") if isolated(text, pos, end, ".-/", grouped=text[pos] != "+") else []


_IBAN_LENGTHS = {entry[:2]: int(entry[2:]) for entry in (
    "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 EG29 "
    "ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 "
    "LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29 PT25 "
    "QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20 YE30"
).split()}


def iban_at(text: str, pos: int) -> list[Span]:
    start = pos - 2  # the seed sits on the first check digit
    length = _IBAN_LENGTHS.get(text[start:start + 2].upper()) if start >= 0 and text[pos - 1].isalpha() else None
    if length is None:
        return []
    compact, end = [], start
    while end < len(text) and len(compact) < length:  # exactly the country's length, single spaces allowed
        if text[end].isascii() and text[end].isalnum():
            compact.append(text[end])
        elif text[end] != " " or text[end + 1:end + 2] in ("", " "):
            break
        end += 1
    iban = "".join(compact).upper()
    if len(iban) != length or not isolated(text, start, end, ""):
        return []
    return one_span(start, end, "IBAN") if int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1 else []


_EMAIL_DOMAIN = re.compile(r"[\w\-]+(?:\.[\w\-]+)*\.[^\W\d_]{2,}\b")


def _email_spans(text: str) -> list[Span]:
    """Found from each '@' outwards: a regex starting with the local part would be tried at every position."""
    spans: list[Span] = []
    at = text.find("@")
    while at != -1:
        start = at
        while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._%+-"):
            start -= 1
        if start < at and (domain := _EMAIL_DOMAIN.match(text, at + 1)):
            spans += one_span(start, domain.end(), "EMAIL")
        at = text.find("@", at + 1)
    return spans


_PLUS_SEED = re.compile(r"\+[1-9]")  # +44 ...
_PAREN_SEED = re.compile(r"\([2-9][0-9]{2}\)")  # (202) ...
_COLON_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")  # 2001:db8::1


def plus_phone_spans(text: str) -> list[Span]:
    """+44 20 7946 0958: phones found from their '+'."""
    return [span for seed in _PLUS_SEED.finditer(text) for span in phone_at(text, seed.start())] if "+" in text else []


def paren_phone_spans(text: str) -> list[Span]:
    """(202) 555-0143: phones found from their bracketed area code."""
    return [span for seed in _PAREN_SEED.finditer(text) for span in phone_at(text, seed.start())] if "(" in text else []


def ipv6_spans(text: str) -> list[Span]:
    """IPv6 addresses, found from their colons; each run of hex digits and colons is judged once."""
    spans: list[Span] = []
    run_end = 0
    for seed in _COLON_SEED.finditer(text) if ":" in text else ():
        if seed.start() >= run_end:
            found, run_end = _ipv6_at(text, seed.start())
            spans += found
    return spans


def at_sign_email_spans(text: str) -> list[Span]:
    return _email_spans(text) if "@" in text else []

