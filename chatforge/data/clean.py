"""Tidy the text of each message: Unicode, control characters, whitespace, HTML, punctuation runs, spelling, capitals.

Use it like this::

    clean = make_cleaner(cfg.prepare.clean)        # compile once, then call per message
    clean("Hi&nbsp;there!!!!!  <b>Order</b> #12")  # 'Hi there!!! Order #12'
    clean_text("ﬁle", CleanConfig())              # one-off: 'file'

The steps run in this order, each behind its `CleanConfig` switch (`enabled=False` returns the text unchanged):

1. `strip_html`: drop tags of known HTML elements (their text stays; <br>, <p>, <div>, <li>, headings and the like
   become line breaks), drop <script>/<style> blocks and comments, and decode entities written with a `;`
   (`&amp;`, `&#39;`, `&nbsp;`). Text that only looks like markup stays: "a < b and c > d", "<3", "List<T>", "AT&T".
2. `unicode_nfkc`: NFKC normalisation (full-width letters, ligatures, compatibility spaces and digits).
3. always: control characters go (tab and newline stay; zero-width space, soft hyphen and BOM go too).
4. `collapse_punctuation`: a run of four or more of '!' and '?' keeps its first three ('!!!!!' -> '!!!',
   '?!?!?!' -> '?!?'); four or more dots become '...'; repeated commas become one. Three stays three because
   'great!!!' still says something that 'great!' does not.
5. always: newlines become '\\n', trailing spaces go, runs of spaces/tabs inside a line become one space (leading
   indentation is kept so code and nested lists survive), at most one blank line in a row, both ends stripped.
6. `spelling`: pyspellchecker fixes unknown lowercase words (`pip install 'chatforge[spell]'`); words with
   capitals or digits, URLs, e-mail addresses and placeholders such as [EMAIL] are left alone.
7. `capitalize`: upper-case the first letter of the message and of each sentence after '.', '!' or '?'.

Placeholders written by redaction ([EMAIL], [PHONE], ...) pass every step untouched. The cleaner is a picklable
object, so it can be handed to worker processes.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable
from functools import cache
from typing import Any

from chatforge.config import CleanConfig

# Only names of real HTML elements count as tags, so "x<y>" or "List<T>" in a chat message is left alone.
_INLINE_TAGS = (
    "a abbr b bdi bdo big cite code del dfn em font i img input ins kbd label mark nobr q s samp small span strike "
    "strong sub sup td th time tt u var wbr html head body title meta link button form select option textarea "
    "iframe thead tbody tfoot caption figure figcaption main aside section article header footer nav center o:p"
).split()
_BLOCK_TAGS = "br p div h1 h2 h3 h4 h5 h6 blockquote pre table ul ol hr address dl".split()
_ITEM_TAGS = "li tr dt dd".split()  # a new line when the item opens, nothing when it closes
# Attributes need a value: without one, "a<b and c>d" would read as a <b> tag with attributes 'and' and 'c'.
_ATTRIBUTE = r"""\s+[A-Za-z_:][-\w:.]*\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+)"""
_TAG = re.compile(
    r"<(?P<closing>/?)(?P<name>" + "|".join(map(re.escape, _INLINE_TAGS + _BLOCK_TAGS + _ITEM_TAGS)) + r")"
    r"(?:" + _ATTRIBUTE + r")*\s*/?>",
    re.IGNORECASE,
)
# Where a <script>/<style> block or a comment opens, and what closes each; `_drop_blocks` pairs them in one pass.
_BLOCK_OPENING = re.compile(r"<(?:(script|style)\b|!--)", re.IGNORECASE)
_BLOCK_CLOSING = {"script": re.compile(r"</script\s*>", re.IGNORECASE), "style": re.compile(r"</style\s*>", re.IGNORECASE),
                  "comment": re.compile("-->")}
# Entities need their ';': html.unescape alone would turn "&notice" into "¬ice".
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

# Control characters go (tab and '\n' stay); other systems' line breaks (\r, form feed, U+2028, ...) become '\n'.
_LINE_BREAK_CHARACTERS = "\r\x0b\x0c\x85\u2028\u2029"
_ASCII_CONTROL_BYTES = bytes([*range(0, 9), *range(11, 32), 127])  # all but tab and newline
# (Lone surrogates, from a JSON '\ud800' escape, go too: they cannot be written as UTF-8.)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\u2028\u2029\ufeff\ud800-\udfff]")
_PUNCTUATION_RUN = re.compile(r"[!?]{4,}|\.{4,}|,{2,}")
# Two or more spaces/tabs, one tab, or one space before a line break; `_replace_space_run` decides what each becomes.
# (Starting every branch with the same character class lets the regex engine skip ahead fast.)
_SPACE_RUN = re.compile(r"[ \t](?:[ \t]+|(?<=\t)|(?=\n))")
_BLANK_LINES = re.compile(r"\n{3,}")

# Spelling looks at whitespace-separated tokens; a token is a word to check only if, without the punctuation
# around it, it is all lowercase ASCII letters (so URLs, addresses, file names, codes and [EMAIL] never are).
_TOKEN = re.compile(r"\S+")
_PUNCTUATION_AROUND_WORDS = ".,!?;:\"'()"
# A sentence starts at the message start, or after . ! ? (maybe closed by a quote or bracket) and whitespace.
_FIRST_WORD = re.compile(r"\s*(?P<word>[a-z]\S*)")
_SENTENCE_BREAK = re.compile(r"[.!?][\"')\]]*\s+(?=(?P<word>[a-z]\S*))")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "incl.", "esp.", "no.", "ca."}
_LONGEST_ABBREVIATION = max(map(len, _ABBREVIATIONS))
MAX_SPELLING_WORD = 30
"""Longer words are left as they are: no English word needs it, and edit-distance candidates grow with the square."""


class Cleaner:
    """A compiled text cleaner: `Cleaner(cfg)(text) -> text`. Prefer `make_cleaner(cfg)`; see the module docstring."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self._spell_checker: Any = _load_spell_checker() if cfg.enabled and cfg.spelling else None
        self._spelling_fixes: dict[str, str] = {}
        switches = cfg.model_dump()
        self._steps = [step for name, step in CLEANING_STEPS.items() if switches.get(name, True)]
        if self._spell_checker is not None:
            self._steps.insert(self._steps.index(normalise_whitespace) + 1, self.correct_spelling)

    def __reduce__(self) -> tuple[type[Cleaner], tuple[CleanConfig]]:
        # Rebuild in the worker instead of pickling the spell checker's word list.
        return (Cleaner, (self.cfg,))

    def __call__(self, text: str) -> str:
        if not self.cfg.enabled or not text:
            return text
        for step in self._steps:
            text = step(text)
        return text

    def correct_spelling(self, text: str) -> str:
        """The `spelling` step: fix unknown lowercase words (see the module docstring)."""
        return _TOKEN.sub(self._correct_token, text)

    def _correct_token(self, match: re.Match[str]) -> str:
        token = match.group(0)
        word = token.strip(_PUNCTUATION_AROUND_WORDS)
        if not 2 <= len(word) <= MAX_SPELLING_WORD or not (word.isascii() and word.islower() and word.replace("'", "").isalpha()):
            return token
        fixed = self._spelling_fixes.get(word)
        if fixed is None:
            known = self._spell_checker.known([word])
            fixed = word if known else (self._spell_checker.correction(word) or word)
            self._spelling_fixes[word] = fixed
        if fixed == word:
            return token
        start = token.index(word)
        return token[:start] + fixed + token[start + len(word) :]


def make_cleaner(cfg: CleanConfig) -> Callable[[str], str]:
    """Build the cleaner once (regexes, spell checker) and call it per message: `make_cleaner(cfg)(text)`.

    Raises ImportError naming the `spell` extra when `cfg.spelling` is on and pyspellchecker is missing.
    """
    return Cleaner(cfg)


def clean_text(text: str, cfg: CleanConfig) -> str:
    """Clean one string: `clean_text("ﬁne!!!!", CleanConfig())` -> 'fine!!!'. Use `make_cleaner` in loops."""
    return Cleaner(cfg)(text)


def strip_html(text: str) -> str:
    """Drop HTML tags and decode entities: `strip_html("<p>a &amp; b</p>")` -> '\\na & b\\n' (whitespace is later)."""
    if "<" in text:
        text = _drop_blocks(text)
        text = _TAG.sub(_replace_tag, text)
    if "&" in text:
        text = _ENTITY.sub(_decode_entity, text)
    return text


def _drop_blocks(text: str) -> str:
    """Remove <script>/<style> blocks and <!-- comments -->; one that is never closed stays as written.

    One pass: each search starts where the last one left off, and a closing tag found once is reused by the
    openings before it, so unclosed openings repeated 20,000 times cost what one does (a lazy `.*?` per opening
    would rescan the rest of the text from each).
    """
    pieces: list[str] = []
    position = 0
    next_closing: dict[str, re.Match[str] | None] = {}  # per kind: the first closing at or after the last search
    next_gt = -2  # position of the first '>' after the last search (-1: none left)
    while opening := _BLOCK_OPENING.search(text, position):
        kind = opening.group(1).lower() if opening.group(1) else "comment"
        body_start = opening.end()
        if kind != "comment":  # the opening tag runs to its '>'
            if next_gt != -1 and next_gt < body_start:
                next_gt = text.find(">", body_start)
            if next_gt == -1:
                break
            body_start = next_gt + 1
        closing = next_closing.get(kind, False)
        if closing is False or (closing is not None and closing.start() < body_start):
            closing = next_closing[kind] = _BLOCK_CLOSING[kind].search(text, body_start)
        if closing is None:  # never closed: keep the opening as text and look for the next one
            pieces.append(text[position:opening.end()])
            position = opening.end()
            continue
        pieces.append(text[position:opening.start()])
        position = closing.end()
    pieces.append(text[position:])
    return "".join(pieces)


def _replace_tag(match: re.Match[str]) -> str:
    name = match.group("name").lower()
    if name in _BLOCK_TAGS:
        return "\n"
    if name in _ITEM_TAGS:
        return "" if match.group("closing") else "\n"
    return " " if name in ("td", "th") else ""


def _decode_entity(match: re.Match[str]) -> str:
    decoded = html.unescape(match.group(0))
    return decoded.replace("\xa0", " ")  # &nbsp; is a space to a reader, NFKC or not


def _remove_control_characters(text: str) -> str:
    if text.isascii():  # the common case: deleting control bytes in C is far cheaper than a regex scan
        if len(text.encode("ascii").translate(None, _ASCII_CONTROL_BYTES)) == len(text):
            return text
    elif text.isprintable():
        return text
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    return _CONTROL.sub(_replace_control_character, text)


def _replace_control_character(match: re.Match[str]) -> str:
    return "\n" if match.group(0) in _LINE_BREAK_CHARACTERS else ""


def collapse_punctuation(text: str) -> str:
    """'!!!!!' -> '!!!', '?!?!?!' -> '?!?', '.....' -> '...', ',,' -> ','."""
    return _PUNCTUATION_RUN.sub(_shorten_punctuation_run, text) if _may_hold_punctuation_run(text) else text


def _may_hold_punctuation_run(text: str) -> bool:
    # `in` is much cheaper than a regex scan; any text _PUNCTUATION_RUN matches passes this test.
    if ("!" in text or "?" in text) and ("!!!!" in text or "????" in text or "!?" in text or "?!" in text):
        return True
    return "...." in text or ",," in text


def _shorten_punctuation_run(match: re.Match[str]) -> str:
    run = match.group(0)
    if run[0] == ".":
        return "..."
    if run[0] == ",":
        return ","
    return run[:3]


def normalise_whitespace(text: str) -> str:
    """Trailing spaces, inner runs of spaces/tabs and extra blank lines go; ends are stripped; indentation stays."""
    if "\t" in text or "  " in text or ("\n" in text and " \n" in text):
        text = _SPACE_RUN.sub(_replace_space_run, text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _replace_space_run(match: re.Match[str]) -> str:
    text, start, end = match.string, match.start(), match.end()
    if end == len(text) or text[end] == "\n":
        return ""  # trailing spaces
    if start == 0 or text[start - 1] == "\n":
        return match.group(0)  # indentation
    return " "


def capitalise_sentences(text: str) -> str:
    """Upper-case the first letter of the text and of each sentence: 'hi. how are you?' -> 'Hi. How are you?'.

    Sentences after 'e.g.', 'etc.' and an ellipsis are not new sentences; URLs and e-mail addresses stay as written.
    """
    starts = []
    first_word = _FIRST_WORD.match(text)
    if first_word:
        starts.append(first_word)
    if "." in text or "!" in text or "?" in text:
        starts.extend(m for m in _SENTENCE_BREAK.finditer(text) if not _ends_abbreviation(text, m.start()))
    positions = [m.start("word") for m in starts if not _looks_like_address(m.group("word"))]
    if not positions:
        return text
    chars = list(text)
    for position in positions:
        chars[position] = chars[position].upper()
    return "".join(chars)


def _ends_abbreviation(text: str, punctuation_at: int) -> bool:
    # Only the last few characters can matter, so only they are looked at (a search back to the previous space
    # would cost the whole text for every sentence break of a text without spaces).
    window = text[max(0, punctuation_at - _LONGEST_ABBREVIATION) : punctuation_at + 1]
    token = window.rsplit(None, 1)[-1]
    whole_token = token != window or punctuation_at <= _LONGEST_ABBREVIATION
    return (whole_token and token.lower() in _ABBREVIATIONS) or token.endswith("..")


def _looks_like_address(word: str) -> bool:
    return "://" in word or "@" in word or word.startswith("www.")


def _unicode_nfkc(text: str) -> str:
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


CLEANING_STEPS: dict[str, Callable[[str], str]] = {
    "strip_html": strip_html,
    "unicode_nfkc": _unicode_nfkc,
    "control_characters": _remove_control_characters,
    "collapse_punctuation": collapse_punctuation,
    "whitespace": normalise_whitespace,
    "capitalize": capitalise_sentences,
}
"""The cleaning steps in the order they run, by name; a name that is a CleanConfig switch runs only when it is on.
(`spelling` runs after `whitespace` and needs a spell checker: `Cleaner.correct_spelling`.) Every step is linear in
the text's length; tests/data/test_linear_time.py times each on adversarial text."""


def _load_spell_checker() -> Any:
    try:
        from spellchecker import SpellChecker  # lazy: optional extra chatforge[spell], absent by default (~40 ms)
    except ImportError as exc:
        raise ImportError(
            "spelling correction (prepare.clean.spelling) needs pyspellchecker: pip install 'chatforge[spell]'"
        ) from exc
    return _shared_spell_checker(SpellChecker)


@cache
def _shared_spell_checker(spell_checker_class: Any) -> Any:
    # The word list takes a while to load, so it is loaded once per process and shared (lookups do not change it).
    # Distance 1 catches most chat typos ('teh', 'recieve') and stays fast on long unknown words.
    return spell_checker_class(distance=1)
