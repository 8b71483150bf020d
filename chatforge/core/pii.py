"""Mask personal data and secrets in chat text before it reaches a dataset, a model or a stored conversation.

Use it like this::

    redactor = Redactor(types=["EMAIL", "PHONE", "API_KEY"])        # compile once ...
    text, counts = redactor.redact("Mail ana@example.com or call +44 20 7946 0958")
    # 'Mail [EMAIL] or call [PHONE]', Counter({'EMAIL': 1, 'PHONE': 1})
    messages, counts = redactor.redact_messages(record["messages"])   # ... call many times
    redact_text("the server is 10.0.0.7")                             # one-off, default types

Every hit becomes its type in brackets (`[EMAIL]`, `[PHONE]`, ...). What each type matches:

- EMAIL: local@domain.tld.
- SSN: US 123-45-6789, except the never-issued areas 000/666/9xx, group 00 and serial 0000.
- PHONE: + or 00 international numbers (8-15 digits), North American (202) 555-0143, 202.555.0143, 202-555-0143,
  and national numbers with a trunk 0 (020 7946 0958). A number needs a + or separators: a bare digit run is more
  often an order number than a phone.
- CREDIT_CARD: 13-19 digits starting with 2-9 (payment networks), maybe grouped by spaces or dashes, passing Luhn.
- IBAN: country code, check digits and exactly that country's length (single spaces allowed), passing mod-97.
- IP_ADDRESS: IPv4 and IPv6 (compressed forms too), validated by `ipaddress`. Left alone: "version 1.2.3.4",
  "pkg>=1.2.0.0", and addresses that identify nothing (127.0.0.1, ::1, 0.0.0.0, netmasks like 255.255.255.0).
- URL_CREDENTIALS: only the user:password part goes and the host stays: postgres://[URL_CREDENTIALS]@db.example.com.
- API_KEY: known prefixes (sk-, sk_live_/pk_live_/rk_live_, ghp_/gho_/ghu_/ghs_/ghr_, github_pat_, xoxb-/xoxp-/xoxa-,
  AKIA/ASIA, AIza, glpat-, hf_), JWTs, the token after "Bearer", and random-looking tokens (see `_looks_random`).
  Hex-only strings (git SHAs, checksums, UUIDs) are not treated as secrets: they name objects, not people or keys.
- PERSON: only with `person_names=True` (Presidio) or through `extra_detectors`.

Where hits overlap the more specific type wins (URL credentials, prefixed keys, email, IBAN, card, SSN, IP, phone,
extra detectors, random-looking tokens), then the longer hit. For speed, one scan of a regex whose every branch starts
with a digit finds the places worth a look (the regex engine skips prose between digits quickly), and validators run
only there. Keys and tokens are found through their digits too, so one without any digit is missed (a random base62
key of 32 chars has none 0.4% of the time, of 40 chars 0.1%), except AWS ids and Bearer tokens, which are found by
their literal start. Nothing here logs or keeps the original values.

Safe on untrusted text of any size (the API server redacts what users send): every detector is linear in the text's
length (bounded matches at seeds, each run judged once; see `pii_detectors`), and overlapping hits are resolved
with a coverage map, not by comparing every pair. tests/data/test_linear_time.py checks each registered detector
on 10 KB vs 100 KB of adversarial text.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

from chatforge.config import PII_TYPES, PiiConfig
from chatforge.core.pii_detectors import _PRIORITY, DEFAULT_TYPES, DIGIT_MATCHERS, SCANNERS, Span, digit_seeded_spans

Detector = Callable[[str], list[tuple[int, int, str]]]


class Redactor:
    """Replace personal data with `[TYPE]` placeholders; compile once, call many times (also from the API server).

        redactor = Redactor.from_config(cfg.prepare.pii)
        text, counts = redactor.redact("call +1-202-555-0143")     # ('call [PHONE]', Counter({'PHONE': 1}))

    `types` picks from PII_TYPES (default: all but PERSON). `person_names=True` adds Presidio's PERSON detector.
    `extra_detectors` map text -> [(start, end, TYPE)]; their hits are applied whatever `types` says, and lose
    overlaps against the built-in types except random-looking tokens. A Redactor pickles, so it can go to workers.
    """

    def __init__(self, types: Collection[str] | None = None, person_names: bool = False,
                 extra_detectors: Sequence[Detector] = ()) -> None:
        self.types = DEFAULT_TYPES if types is None else frozenset(types)
        unknown = sorted(self.types - set(PII_TYPES))
        if unknown:
            raise ValueError(f"unknown PII types {unknown}; known: {PII_TYPES}")
        self._digit_matchers = tuple(matcher for kind, matcher in DIGIT_MATCHERS if kind in self.types)
        self._keys = "API_KEY" in self.types
        self._scanners = tuple(scanner for kind, scanner in SCANNERS if kind in self.types)
        self._extra_detectors = tuple(extra_detectors) + ((presidio_person_detector(),) if person_names else ())

    @classmethod
    def from_config(cls, cfg: PiiConfig) -> Redactor:
        """The redactor `chatforge prepare` uses; `enabled: false` gives one that changes nothing."""
        return cls(types=cfg.types, person_names=cfg.person_names) if cfg.enabled else cls(types=())

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """Return the text with every hit replaced by `[TYPE]`, and how many hits of each type were replaced."""
        spans = self._find(text)
        if not spans:
            return text, Counter()
        spans.sort(key=lambda span: (span[3], span[0] - span[1], span[0]))  # most specific, then longest, first
        taken = bytearray(len(text))  # 1 where a kept span lies: the overlap test costs the span's length, not #kept
        kept: list[Span] = []
        for span in spans:
            start, end = span[0], span[1]
            if taken.find(1, start, end) == -1:
                kept.append(span)
                taken[start:end] = b"\x01" * (end - start)
        kept.sort()
        pieces, last = [], 0  # offsets all refer to the original text, so splicing left to right is safe
        for start, end, kind, _ in kept:
            pieces += [text[last:start], f"[{kind}]"]
            last = end
        pieces.append(text[last:])
        return "".join(pieces), Counter(kind for _, _, kind, _ in kept)

    def redact_messages(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], Counter[str]]:
        """Return new messages with 'content' redacted (other keys kept as they are) and the summed counts."""
        redacted: list[dict[str, str]] = []
        total: Counter[str] = Counter()
        for message in messages:
            message = dict(message)
            if isinstance(message.get("content"), str):
                message["content"], counts = self.redact(message["content"])
                if counts:  # Counter.update costs more than the redaction of a short clean message
                    total.update(counts)
            redacted.append(message)
        return redacted, total

    def _find(self, text: str) -> list[Span]:
        spans = digit_seeded_spans(text, self._digit_matchers, self._keys) if self._digit_matchers or self._keys else []
        for scanner in self._scanners:
            spans += scanner(text)
        for detector in self._extra_detectors:
            for start, end, kind in detector(text):
                if not (0 <= start < end <= len(text) and isinstance(kind, str) and kind):
                    raise ValueError(f"extra detector {detector!r} returned span ({start}, {end}, {kind!r}); "
                                     f"expected 0 <= start < end <= {len(text)} and a non-empty type name")
                spans.append((start, end, kind, _PRIORITY["extra"]))
        return spans


@functools.lru_cache(maxsize=16)
def _shared_redactor(types: frozenset[str] | None) -> Redactor:
    return Redactor(types)


def redact_text(text: str, types: Collection[str] | None = None) -> tuple[str, Counter[str]]:
    """One-off redaction with a cached Redactor per set of types: redact_text("mail a@b.io")[0] == 'mail [EMAIL]'."""
    return _shared_redactor(None if types is None else frozenset(types)).redact(text)


def presidio_person_detector(spacy_model: str = "en_core_web_lg", min_score: float = 0.5) -> Detector:
    """PERSON spans from Presidio: `Redactor(extra_detectors=[presidio_person_detector()])`, or `person_names=True`.

    Needs `pip install presidio-analyzer` and `python -m spacy download en_core_web_lg`; raises RuntimeError saying
    so when either is missing. The analyzer loads on first use, once per process; the detector pickles.
    """
    if importlib.util.find_spec("presidio_analyzer") is None:
        raise RuntimeError("person-name detection needs Presidio: pip install presidio-analyzer && "
                           f"python -m spacy download {spacy_model}")
    if importlib.util.find_spec(spacy_model) is None:
        raise RuntimeError(f"person-name detection needs the spaCy model {spacy_model!r}: "
                           f"python -m spacy download {spacy_model}")
    return functools.partial(_presidio_persons, spacy_model=spacy_model, min_score=min_score)


def _presidio_persons(text: str, spacy_model: str, min_score: float) -> list[tuple[int, int, str]]:
    results = _presidio_analyzer(spacy_model).analyze(text=text, language="en", entities=["PERSON"],
                                                      score_threshold=min_score)
    return [(result.start, result.end, "PERSON") for result in results]


@functools.lru_cache(maxsize=2)
def _presidio_analyzer(spacy_model: str) -> Any:
    # lazy: presidio and its spaCy model are an optional extra (names only), seconds to import
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    nlp_config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": spacy_model}]}
    return AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=nlp_config).create_engine(),
                          supported_languages=["en"])
