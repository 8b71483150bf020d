"""Find exact and near-duplicate conversations, keeping the first of each.

Use it like this::

    texts = [conversation_text(r) for r in records]
    matches = find_duplicates(texts, cfg.prepare.dedup)
    dropped = {m.index for m in matches}
    kept = [r for i, r in enumerate(records) if i not in dropped]
    # each match says why: DuplicateMatch(index=7, kept_index=2, kind="near", similarity=0.91)

Two texts are the *same* when `normalise_for_dedup` makes them equal (case, whitespace and punctuation at word edges
do not count). They are *near* duplicates when the Jaccard similarity of their word n-gram sets, estimated with
MinHash, reaches `cfg.threshold`. Candidates come from a datasketch `MinHashLSH` index and are then checked against
the estimate, because LSH alone lets dissimilar pairs through.

Why the featurisation is numpy instead of a loop over words: a prepare run sees ~7k conversations of ~1k words,
and a Python call per word (split, strip, hash) costs seconds on a small machine. Here a block of texts becomes
one array of code points; words, word hashes, n-gram hashes and MinHash signatures are whole-array operations.
The signatures equal what datasketch's own `MinHash(scheme="affine32").update_batch` computes from the same
n-gram hashes, so they can be indexed and compared with datasketch as they are.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from chatforge.config import DedupConfig

_NORMALISED_WORD = re.compile(r"\w(?:\S*\w)?")
_BLOCK_CHARS = 1 << 18  # code points per featurised block: enough to amortise numpy calls, small enough to share out
_SIGNATURE_SEED = 1
_SIGNATURE_SCHEME = "affine32"
# The LSH index only proposes candidates; each is verified against the threshold afterwards. So its parameters are
# tuned to miss few true pairs (weight 0.9 on false negatives) rather than to avoid extra candidates.
_LSH_WEIGHTS = (0.1, 0.9)
_SPACE, _WORD, _OTHER = 0, 1, 2
_POLYNOMIAL_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64


@dataclass(frozen=True)
class DuplicateMatch:
    """One dropped record: `index` duplicates `kept_index` (earlier, and itself kept)."""

    index: int
    kept_index: int
    kind: str  # "exact" or "near"
    similarity: float  # 1.0 for exact; estimated Jaccard for near


def normalise_for_dedup(text: str) -> str:
    """`normalise_for_dedup("  Hello,   WORLD! ")` -> "hello world": casefold, strip punctuation at word edges.

    Words are whitespace-separated tokens trimmed to run from their first to their last letter or digit, so
    "don't" and "3.5" stay whole while "(hi)" becomes "hi"; tokens without a letter or digit vanish.
    """
    return " ".join(_NORMALISED_WORD.findall(text.casefold()))


def find_duplicates(texts: Sequence[str], cfg: DedupConfig) -> list[DuplicateMatch]:
    """`find_duplicates(["Hi there", "hi  THERE!", "bye"], DedupConfig())` -> [DuplicateMatch(1, 0, "exact", 1.0)].

    Texts are visited in order; a text that duplicates an earlier kept text is reported against it (the most
    similar one when several qualify, the earliest on ties), otherwise it is kept. A text that is an exact copy of
    an earlier near-duplicate inherits that match (kind "near", same kept text and similarity), so every
    `kept_index` points at a kept text. Matches come back sorted by `index`.
    """
    if not texts or not (cfg.exact or cfg.near):
        return []
    matcher = _InOrderMatcher(cfg, text_count=len(texts))
    featurise = partial(_featurise_block, ngram=cfg.ngram, num_perm=cfg.num_perm, with_signatures=cfg.near)
    # numpy releases the GIL inside its array loops, so threads featurise blocks in parallel (no pickling of texts)
    # while this thread matches the blocks already done, in order.
    with ThreadPoolExecutor(max_workers=min(4, _usable_cpus())) as pool:
        for exact_keys, signatures in pool.map(featurise, _casefolded_blocks(texts)):
            matcher.add_block(exact_keys, signatures)
    return matcher.matches


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class _InOrderMatcher:
    """Decides kept or duplicate for each text in input order; only kept texts enter the indexes."""

    def __init__(self, cfg: DedupConfig, text_count: int) -> None:
        self.cfg = cfg
        self.matches: list[DuplicateMatch] = []
        self.next_index = 0
        # exact key -> what a later copy of that text is reported as: (kept index, kind, similarity)
        self.verdict_by_key: dict[bytes, tuple[int, str, float]] = {}
        self.lsh = _new_lsh(cfg.threshold, cfg.num_perm) if cfg.near else None
        self.signatures = np.empty((text_count, cfg.num_perm), dtype=np.uint32) if cfg.near else None

    def add_block(self, exact_keys: list[bytes], block_signatures: np.ndarray | None) -> None:
        """Match the next texts; `block_signatures` has one row per key (None when near dedup is off)."""
        first = self.next_index
        self.next_index += len(exact_keys)
        if self.signatures is not None and block_signatures is not None:
            self.signatures[first : self.next_index] = block_signatures
        for index, key in enumerate(exact_keys, start=first):
            if self.cfg.exact and key in self.verdict_by_key:
                self.matches.append(DuplicateMatch(index, *self.verdict_by_key[key]))
                continue
            near_match = self._near_match(index) if self.lsh is not None else None
            if near_match is None:
                self.verdict_by_key[key] = (index, "exact", 1.0)
            else:
                self.matches.append(near_match)
                self.verdict_by_key[key] = (near_match.kept_index, "near", near_match.similarity)

    def _near_match(self, index: int) -> DuplicateMatch | None:
        """The verified near match of text `index` among kept texts; a text without one is indexed as kept."""
        assert self.lsh is not None and self.signatures is not None
        minhash = LeanMinHash(seed=_SIGNATURE_SEED, hashvalues=self.signatures[index], scheme=_SIGNATURE_SCHEME)
        near_match = _best_verified_candidate(index, self.lsh.query(minhash), self.signatures, self.cfg.threshold)
        if near_match is None:
            self.lsh.insert(index, minhash, check_duplication=False)
        return near_match


def _best_verified_candidate(
    index: int, candidates: list[int], signatures: np.ndarray, threshold: float
) -> DuplicateMatch | None:
    """The most similar LSH candidate whose estimated Jaccard reaches the threshold (earliest on ties), or None."""
    if not candidates:
        return None
    candidate_indexes = np.array(sorted(candidates), dtype=np.int64)
    agreeing = np.count_nonzero(signatures[candidate_indexes] == signatures[index], axis=1)
    similarities = agreeing / signatures.shape[1]
    best = int(np.argmax(similarities))  # argmax returns the first maximum, i.e. the earliest text
    if similarities[best] < threshold:
        return None
    return DuplicateMatch(index, int(candidate_indexes[best]), "near", float(similarities[best]))


def _new_lsh(threshold: float, num_perm: int) -> MinHashLSH:
    """A datasketch LSH index for the threshold; the extremes 0 and 1 get the banding nearest to them."""
    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    except ValueError:
        # The optimiser picks a single band near threshold 1, which datasketch refuses; two bands are the strictest
        # it accepts, and the verification step still enforces the threshold.
        return MinHashLSH(threshold=threshold, num_perm=num_perm, params=(2, num_perm // 2))


# --- featurisation: texts -> exact keys and MinHash signatures, a block of texts at a time -------------------------


def _casefolded_blocks(texts: Sequence[str]) -> Iterator[list[str]]:
    """Consecutive runs of casefolded texts of about `_BLOCK_CHARS` code points each."""
    block: list[str] = []
    block_chars = 0
    for text in texts:
        folded = text.casefold()
        block.append(folded)
        block_chars += len(folded) + 1
        if block_chars >= _BLOCK_CHARS:
            yield block
            block, block_chars = [], 0
    if block:
        yield block


def _featurise_block(
    folded_texts: list[str], ngram: int, num_perm: int, with_signatures: bool
) -> tuple[list[bytes], np.ndarray | None]:
    """Exact keys and signatures of casefolded texts; texts are joined by newlines so no word spans two texts."""
    joined = "\n".join(folded_texts)
    code_points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    text_starts = np.zeros(len(folded_texts), dtype=np.int64)
    np.cumsum([len(t) + 1 for t in folded_texts[:-1]], out=text_starts[1:])

    word_starts, word_ends = _normalised_word_spans(code_points)
    word_hashes = _word_hashes(code_points, word_starts, word_ends)
    word_text = np.searchsorted(text_starts, word_starts, side="right") - 1
    words_per_text = np.bincount(word_text, minlength=len(folded_texts))
    first_word = np.zeros(len(folded_texts), dtype=np.int64)
    np.cumsum(words_per_text[:-1], out=first_word[1:])

    # Equal word-hash sequences <=> equal normalised texts (up to a 64-bit collision per word).
    exact_keys = [
        hashlib.blake2b(word_hashes[start : start + count].tobytes(), digest_size=16).digest()
        for start, count in zip(first_word.tolist(), words_per_text.tolist())
    ]
    if not with_signatures:
        return exact_keys, None
    shingle_hashes, shingle_text = _shingle_hashes(word_hashes, word_text, first_word, words_per_text, ngram)
    return exact_keys, _minhash_signatures(shingle_hashes, shingle_text, num_perm)


def _normalised_word_spans(code_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (inclusive) of each word `normalise_for_dedup` would keep: first to last \\w of a token."""
    classes = _char_classes(code_points)
    non_space = classes != _SPACE
    token_start = non_space.copy()
    token_start[1:] &= ~non_space[:-1]
    token_id = np.cumsum(token_start)
    word_char_positions = np.flatnonzero(classes == _WORD)
    if len(word_char_positions) == 0:
        return word_char_positions, word_char_positions
    word_char_token = token_id[word_char_positions]
    new_token = np.ones(len(word_char_positions), dtype=bool)
    new_token[1:] = word_char_token[1:] != word_char_token[:-1]
    first = np.flatnonzero(new_token)
    last = np.append(first[1:] - 1, len(word_char_positions) - 1)
    return word_char_positions[first], word_char_positions[last]


def _word_hashes(code_points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 64-bit hash per word: its polynomial hash sum (c + 1) * P^offset mod 2^64, then avalanched.

    Prefix sums of (c + 1) * P^position over the whole block give every word's sum scaled by P^start in O(1); P is
    odd, so multiplying by P^-start (mod 2^64) undoes the scaling and the hash depends only on the word.
    """
    powers, inverse_powers = _polynomial_powers(len(code_points))
    prefix = np.zeros(len(code_points) + 1, dtype=np.uint64)
    np.cumsum((code_points + np.uint64(1)) * powers[: len(code_points)], out=prefix[1:])
    return _fmix64((prefix[ends + 1] - prefix[starts]) * inverse_powers[starts])


def _shingle_hashes(
    word_hashes: np.ndarray,
    word_text: np.ndarray,
    first_word: np.ndarray,
    words_per_text: np.ndarray,
    ngram: int,
) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each text's word n-grams, grouped by text; a text under n words is one shingle.

    A text with no words at all gets one shingle of hash 0, so every text has a signature.
    """
    multipliers = _ngram_multipliers(ngram)
    full_starts = max(0, len(word_hashes) - ngram + 1)
    # every n consecutive words, whether or not they cross a text boundary; the crossing ones are dropped below
    combined = np.zeros(full_starts, dtype=np.uint64)
    for position, multiplier in enumerate(multipliers):
        combined += word_hashes[position : position + full_starts] * multiplier
    last_full_start = first_word + words_per_text - ngram  # per text; below first_word when the text is short
    inside_a_text = np.arange(full_starts) <= last_full_start[word_text[:full_starts]]
    shingle_hashes = (combined[inside_a_text] >> np.uint64(32)).astype(np.uint32)
    shingle_text = word_text[:full_starts][inside_a_text]
    short_texts = np.flatnonzero((words_per_text > 0) & (words_per_text < ngram))
    if len(short_texts):
        # the same sum over the words a short text has
        short_combined = np.zeros(len(short_texts), dtype=np.uint64)
        for position, multiplier in enumerate(multipliers[:-1]):
            has_word = position < words_per_text[short_texts]
            word_index = np.where(has_word, first_word[short_texts] + position, 0)
            short_combined += np.where(has_word, word_hashes[word_index], np.uint64(0)) * multiplier
        shingle_hashes = np.concatenate([shingle_hashes, (short_combined >> np.uint64(32)).astype(np.uint32)])
        shingle_text = np.concatenate([shingle_text, short_texts])
    empty_texts = np.flatnonzero(words_per_text == 0)
    if len(empty_texts):
        shingle_hashes = np.concatenate([shingle_hashes, np.zeros(len(empty_texts), dtype=np.uint32)])
        shingle_text = np.concatenate([shingle_text, empty_texts])
    if len(short_texts) or len(empty_texts):
        order = np.argsort(shingle_text, kind="stable")
        shingle_hashes, shingle_text = shingle_hashes[order], shingle_text[order]
    return shingle_hashes, shingle_text


def _minhash_signatures(shingle_hashes: np.ndarray, shingle_text: np.ndarray, num_perm: int) -> np.ndarray:
    """One row per text: datasketch's affine32 MinHash of the text's shingle hashes (shingles sorted by text)."""
    multipliers, increments = _permutations(num_perm)
    mixed = _fmix32(shingle_hashes)
    # bounds[t]:bounds[t + 1] are text t's shingles
    bounds = np.append(np.flatnonzero(np.diff(shingle_text, prepend=-1)), len(mixed))
    text_count = len(bounds) - 1
    signatures = np.empty((num_perm, text_count), dtype=np.uint32)
    # Permuted values are laid out (num_perm x shingles) so the per-text minimum runs over contiguous memory; a
    # reused buffer of ~4 MB (cache-sized: 2-3x faster than one big matrix) holds as many whole texts as fit.
    columns_per_pass = max(1, (1 << 20) // num_perm)
    buffer = np.empty((num_perm, min(columns_per_pass, len(mixed))), dtype=np.uint32)
    first_text = 0
    while first_text < text_count:
        lo = bounds[first_text]
        end_text = int(np.searchsorted(bounds, lo + columns_per_pass, side="right")) - 1
        end_text = min(max(end_text, first_text + 1), text_count)
        width = bounds[end_text] - lo
        permuted = buffer[:, :width] if width <= buffer.shape[1] else np.empty((num_perm, width), dtype=np.uint32)
        np.multiply(multipliers[:, None], mixed[None, lo : lo + width], out=permuted)
        permuted += increments[:, None]
        signatures[:, first_text:end_text] = np.minimum.reduceat(permuted, bounds[first_text:end_text] - lo, axis=1)
        first_text = end_text
    return np.ascontiguousarray(signatures.T)


# --- hashing constants and helpers ----------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own affine32 permutation parameters (a, b) for seed 1, so signatures interoperate with it."""
    multipliers, increments = MinHash(num_perm=num_perm, seed=_SIGNATURE_SEED, scheme=_SIGNATURE_SCHEME).permutations
    return multipliers.astype(np.uint32), increments.astype(np.uint32)


def _fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, the pre-mix datasketch's affine32 scheme applies to every input hash."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


def _fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every input bit affects every output bit."""
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xFF51AFD7ED558CCD)
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xC4CEB9FE1A85EC53)
    return values ^ (values >> np.uint64(33))


def _fixed_odd_constants(count: int, stream: int) -> np.ndarray:
    """`count` pseudo-random odd 64-bit numbers that are the same in every run (mixed multiples of the golden ratio)."""
    golden = 0x9E3779B97F4A7C15
    state = (np.arange(1, count + 1, dtype=np.uint64) + np.uint64(stream << 32)) * np.uint64(golden)
    return _fmix64(state) | np.uint64(1)


@lru_cache(maxsize=2)
def _polynomial_powers_table(size: int) -> tuple[np.ndarray, np.ndarray]:
    powers = np.full(size, _POLYNOMIAL_BASE, dtype=np.uint64)
    powers[0] = 1
    inverse_powers = np.full(size, pow(_POLYNOMIAL_BASE, -1, 1 << 64), dtype=np.uint64)
    inverse_powers[0] = 1
    # integer ufuncs wrap around, which is exactly arithmetic mod 2^64
    return np.multiply.accumulate(powers), np.multiply.accumulate(inverse_powers)


def _polynomial_powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i mod 2^64 for i < length (tables grown in powers of two and cached)."""
    size = 1 << 16
    while size < length:
        size *= 2
    return _polynomial_powers_table(size)


@lru_cache(maxsize=8)
def _ngram_multipliers(ngram: int) -> list[np.uint64]:
    return [np.uint64(value) for value in _fixed_odd_constants(ngram, stream=2).tolist()]


@lru_cache(maxsize=1)
def _bmp_classes() -> np.ndarray:
    """Space / word / other for every code point below 0x10000, by the same rules as the regex \\s and \\w."""
    return np.fromiter((_classify(chr(c)) for c in range(0x10000)), dtype=np.uint8, count=0x10000)


def _classify(char: str) -> int:
    if char.isspace():
        return _SPACE
    if char.isalnum() or char == "_":
        return _WORD
    return _OTHER


def _char_classes(code_points: np.ndarray) -> np.ndarray:
    """The class of each code point; the rare ones above the BMP (emoji, historic scripts) are classified one by one."""
    classes = _bmp_classes().take(code_points, mode="clip")
    if len(code_points) and int(code_points.max()) > 0xFFFF:
        astral = np.flatnonzero(code_points > 0xFFFF)
        distinct, inverse = np.unique(code_points[astral], return_inverse=True)
        distinct_classes = np.array([_classify(chr(c)) for c in distinct.tolist()], dtype=np.uint8)
        classes[astral] = distinct_classes[inverse]
    return classes
