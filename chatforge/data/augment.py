"""Make noisy copies of training conversations: typos, swapped neighbour words, synonyms.

Use it like this::

    new_records = augment_records(train_records, cfg.prepare.augment)   # only the copies; add them yourself
    train_records += new_records
    augment_text("I want to cancel my order", AugmentConfig(typo_rate=0.2), random.Random(0))

Each input record gives `cfg.copies` deep copies with ids `<id>-aug1`, `<id>-aug2`, ... and
`meta["augmented"] = True`, `meta["augmented_from"] = <id>` (the rest of meta, `source` included, is kept).
Only messages whose role is in `cfg.roles` (the user by default) change; in them, per word:

- synonym (`synonym_rate`): a word from the bundled list `resources/synonyms.txt` becomes one of its synonyms,
  with the original's capitalisation ('Quick' -> 'Fast', 'HELLO' -> 'HI');
- typo (`typo_rate`, words of four or more letters): a neighbouring key on a QWERTY keyboard, a dropped letter,
  a doubled letter or two letters swapped; the first letter is kept so the word stays recognisable;
- swap (`swap_rate`): the word trades places with the next one (plain words only, no punctuation attached).

Placeholders ([EMAIL], [PHONE], ...), URLs, e-mail addresses and anything with a digit are never changed or moved.
Everything is seeded by `cfg.seed`, the record id and the copy number, so a rerun (or another input order) gives
the same copies. Low rates on short messages often change nothing, so a copy that came out identical to the
original (or to an earlier copy) is redrawn a few times; if it still is (say, a message of placeholders only) it
is returned anyway.
"""

from __future__ import annotations

import copy
import random
import re
from functools import cache
from importlib import resources

from chatforge.config import AugmentConfig
from chatforge.core.records import Record

MAX_ATTEMPTS = 20  # draws per copy before an unchanged copy is accepted
SYNONYM_FILE = "resources/synonyms.txt"

# A token that must never change: placeholder ([EMAIL], [CREDIT_CARD], ...), URL, e-mail address, anything with
# a digit.
_PROTECTED = re.compile(r"\[[A-Z][A-Z0-9_]*\]|://|^www\.|@|\d")
# A word with optional quotes/brackets before and punctuation after: '"Hello,' -> ('"', 'Hello', ',').
_WORD = re.compile(r"(?P<lead>[\"'(\[]*)(?P<core>[^\W\d_]+(?:['’-][^\W\d_]+)*)(?P<trail>[.,!?;:\"')\]]*)")
_WHITESPACE = re.compile(r"(\s+)")

_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard (same row left/right, and the rows above and below)."""
    neighbours: dict[str, str] = {}
    for row_index, row in enumerate(_KEYBOARD_ROWS):
        for column, letter in enumerate(row):
            near = [row[c] for c in (column - 1, column + 1) if 0 <= c < len(row)]
            for other_index in (row_index - 1, row_index + 1):
                if 0 <= other_index < len(_KEYBOARD_ROWS):
                    other = _KEYBOARD_ROWS[other_index]
                    near += [other[c] for c in (column - 1, column, column + 1) if 0 <= c < len(other)]
            neighbours[letter] = "".join(near)
    return neighbours


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


def augment_records(records: list[Record], cfg: AugmentConfig) -> list[Record]:
    """Return `cfg.copies` augmented deep copies of each record (the originals are not changed or included)."""
    synonyms = load_synonyms()
    copies = []
    for record in records:
        seen: list[list[str]] = []  # texts of earlier copies of this record, to draw a different one if we can
        for copy_number in range(1, cfg.copies + 1):
            copies.append(_augmented_copy(record, copy_number, cfg, synonyms, seen))
    return copies


def _augmented_copy(
    record: Record,
    copy_number: int,
    cfg: AugmentConfig,
    synonyms: dict[str, tuple[str, ...]],
    seen: list[list[str]],
) -> Record:
    original_id = str(record.get("id"))
    augmented = copy.deepcopy(record)
    augmented["id"] = f"{original_id}-aug{copy_number}"
    meta = augmented.setdefault("meta", {})
    meta["augmented"] = True
    meta["augmented_from"] = original_id

    targets = [m for m in augmented["messages"] if m.get("role") in cfg.roles and isinstance(m.get("content"), str)]
    originals = [m["content"] for m in targets]
    can_change = cfg.typo_rate > 0 or cfg.swap_rate > 0 or cfg.synonym_rate > 0
    for attempt in range(MAX_ATTEMPTS if can_change else 1):
        rng = random.Random(f"{cfg.seed}:{original_id}:{copy_number}:{attempt}")
        noisy = [augment_text(text, cfg, rng, synonyms) for text in originals]
        if noisy != originals and noisy not in seen:
            break
    seen.append(noisy)
    for message, text in zip(targets, noisy):
        message["content"] = text
    return augmented


def augment_text(
    text: str, cfg: AugmentConfig, rng: random.Random, synonyms: dict[str, tuple[str, ...]] | None = None
) -> str:
    """Apply synonyms, typos and word swaps to one message at the rates in `cfg` (see the module docstring)."""
    if synonyms is None:
        synonyms = load_synonyms()
    pieces = _WHITESPACE.split(text)  # words at even positions, the whitespace between them at odd ones
    plain_word = [False] * len(pieces)
    for index in range(0, len(pieces), 2):
        token = pieces[index]
        match = _WORD.fullmatch(token) if token and not _PROTECTED.search(token) else None
        if match is None:
            continue
        core = match.group("core")
        new_core = core
        replacements = synonyms.get(core.lower())
        if replacements and rng.random() < cfg.synonym_rate:
            new_core = match_case(rng.choice(replacements), core)
        elif _letter_count(core) >= 4 and rng.random() < cfg.typo_rate:
            new_core = add_typo(core, rng)
        pieces[index] = match.group("lead") + new_core + match.group("trail")
        plain_word[index] = not match.group("lead") and not match.group("trail")

    if cfg.swap_rate > 0:
        index = 0
        while index + 2 < len(pieces):
            if plain_word[index] and plain_word[index + 2] and rng.random() < cfg.swap_rate:
                pieces[index], pieces[index + 2] = pieces[index + 2], pieces[index]
                index += 4  # a word moves at most once
            else:
                index += 2
    return "".join(pieces)


def add_typo(word: str, rng: random.Random) -> str:
    """One keyboard slip in `word` past its first letter: neighbour key, dropped, doubled or swapped letters."""
    positions = [i for i in range(1, len(word)) if word[i].isalpha()]
    if not positions:
        return word
    position = rng.choice(positions)
    letter = word[position]
    kind = rng.choice(("neighbour", "drop", "double", "swap"))
    if kind == "neighbour" and letter.lower() in KEYBOARD_NEIGHBOURS:
        slip = rng.choice(KEYBOARD_NEIGHBOURS[letter.lower()])
        return word[:position] + (slip.upper() if letter.isupper() else slip) + word[position + 1 :]
    if kind == "swap":
        pairs = [i for i in positions if i + 1 < len(word) and word[i + 1].isalpha() and word[i] != word[i + 1]]
        if pairs:
            i = rng.choice(pairs)
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "double":
        return word[:position] + letter + word[position:]
    return word[:position] + word[position + 1 :]  # dropped letter (also the fallback)


def match_case(replacement: str, original: str) -> str:
    """Give `replacement` the capitalisation of `original`: ('fast', 'QUICK') -> 'FAST', ('fast', 'Quick') -> 'Fast'."""
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _letter_count(word: str) -> int:
    return sum(1 for character in word if character.isalpha())


@cache
def load_synonyms() -> dict[str, tuple[str, ...]]:
    """The bundled synonym groups as word -> the other words of every group it is in (sorted, for determinism)."""
    text = resources.files("chatforge.data").joinpath(SYNONYM_FILE).read_text(encoding="utf-8")
    return parse_synonym_groups(text)


def parse_synonym_groups(text: str) -> dict[str, tuple[str, ...]]:
    """Parse lines of comma-separated synonym groups ('#' comments): 'buy, purchase' -> both map to the other."""
    others: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = [word.strip().lower() for word in line.split("#", 1)[0].split(",") if word.strip()]
        for word in words:
            others.setdefault(word, set()).update(w for w in words if w != word)
    # Phrases ('sign up') are replacements only: lookups are one word at a time.
    return {word: tuple(sorted(synonyms)) for word, synonyms in others.items() if " " not in word and synonyms}
