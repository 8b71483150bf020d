"""Deduplication keeps the first of each exact or near-duplicate conversation and says which one it matched."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from datasketch import MinHash

from chatforge.config import DedupConfig
from chatforge.data import dedup
from chatforge.data.dedup import DuplicateMatch, find_duplicates, normalise_for_dedup

WORDS = (
    "order refund parcel delivery account password invoice payment card address shipping return label tracking "
    "number week day help please thanks customer support agent issue problem broken damaged replace exchange size "
    "colour store online email phone call wait update status cancel subscription plan upgrade charge twice bank "
    "statement receipt discount code voucher expired late missing item box courier driver door neighbour weekend"
).split()


def conversation(seed: int, words: int = 200) -> str:
    """A support chat of about `words` words; different seeds share vocabulary but not wording."""
    rng = random.Random(seed)
    turns = []
    for turn in range(8):
        speaker = "user" if turn % 2 == 0 else "assistant"
        turns.append(f"{speaker}: " + " ".join(rng.choice(WORDS) for _ in range(words // 8)) + ".")
    return "\n".join(turns)


def edit_words(text: str, positions: list[int], replacement: str = "zebra") -> str:
    words = text.split(" ")
    for position in positions:
        words[position] = replacement
    return " ".join(words)


def test_normalise_casefolds_collapses_whitespace_and_strips_edge_punctuation() -> None:
    assert normalise_for_dedup("  Hello,   WORLD!\n\n(Thanks...) ") == "hello world thanks"
    assert normalise_for_dedup("Straße -- “quoted” ?!") == "strasse quoted"


def test_normalise_keeps_punctuation_inside_words() -> None:
    assert normalise_for_dedup("Don't pay 3.5 EUR, e-mail me@x.org.") == "don't pay 3.5 eur e-mail me@x.org"


def test_exact_duplicates_differing_in_case_whitespace_and_punctuation_are_found() -> None:
    texts = [
        "user: Where is my parcel?\nassistant: It ships today.",
        "bye",
        "USER: where is my parcel\n  ASSISTANT: it ships today!",
    ]
    assert find_duplicates(texts, DedupConfig()) == [DuplicateMatch(2, 0, "exact", 1.0)]


@pytest.mark.parametrize("positions", [[57], [20, 140], [100, 102, 105]], ids=["1 edit", "2 edits", "3 edits"])
def test_near_duplicate_with_a_few_word_edits_is_found_at_the_default_threshold(positions: list[int]) -> None:
    original = conversation(seed=1)
    (match,) = find_duplicates([original, edit_words(original, positions)], DedupConfig())
    assert (match.index, match.kept_index, match.kind) == (1, 0, "near")
    assert 0.85 <= match.similarity < 1.0


def test_a_different_conversation_on_the_same_topic_is_not_a_duplicate() -> None:
    assert find_duplicates([conversation(seed=1), conversation(seed=2)], DedupConfig()) == []


def test_near_similarity_estimates_the_jaccard_of_word_ngrams() -> None:
    original = conversation(seed=3, words=400)
    edited = edit_words(original, [50, 250])  # 10 of ~396 5-grams change on each side: Jaccard ~ 0.95
    (match,) = find_duplicates([original, edited], DedupConfig(threshold=0.7))
    assert abs(match.similarity - 0.95) < 0.07


def test_the_first_occurrence_is_kept_and_later_copies_point_at_it() -> None:
    a, b = conversation(seed=4), conversation(seed=5)
    matches = find_duplicates([b, a, a.upper(), b + " ", a], DedupConfig())
    assert [(m.index, m.kept_index) for m in matches] == [(2, 1), (3, 0), (4, 1)]


def test_a_chain_of_near_duplicates_points_at_the_first_not_at_each_other() -> None:
    a = conversation(seed=6)
    a1 = edit_words(a, [30])
    a2 = edit_words(a1, [160])
    other = conversation(seed=7)
    matches = find_duplicates([a, other, a1, a2], DedupConfig())
    assert [(m.index, m.kept_index, m.kind) for m in matches] == [(2, 0, "near"), (3, 0, "near")]


def test_an_exact_copy_of_a_near_duplicate_points_at_the_kept_original() -> None:
    a = conversation(seed=8)
    near = edit_words(a, [90])
    matches = find_duplicates([a, near, near.upper()], DedupConfig())
    assert matches[0].kept_index == 0 and matches[1] == DuplicateMatch(2, 0, "near", matches[0].similarity)


def test_switching_off_near_finds_only_exact_duplicates() -> None:
    a = conversation(seed=9)
    texts = [a, edit_words(a, [10]), a.upper()]
    assert find_duplicates(texts, DedupConfig(near=False)) == [DuplicateMatch(2, 0, "exact", 1.0)]


def test_switching_off_exact_still_catches_copies_as_near_duplicates_of_similarity_one() -> None:
    a = conversation(seed=10)
    texts = [a, edit_words(a, [10]), a.upper()]
    matches = find_duplicates(texts, DedupConfig(exact=False))
    assert [(m.index, m.kept_index, m.kind) for m in matches] == [(1, 0, "near"), (2, 0, "near")]
    assert matches[1].similarity == 1.0


def test_switching_off_both_or_passing_nothing_finds_nothing() -> None:
    a = conversation(seed=11)
    assert find_duplicates([a, a], DedupConfig(exact=False, near=False)) == []
    assert find_duplicates([], DedupConfig()) == []


def test_empty_and_short_texts_are_compared_too() -> None:
    texts = ["", "Hi!", "...", "hi", "thanks a lot", "Thanks, a lot."]
    matches = find_duplicates(texts, DedupConfig())
    assert [(m.index, m.kept_index, m.kind) for m in matches] == [(2, 0, "exact"), (3, 1, "exact"), (5, 4, "exact")]
    assert find_duplicates(["hi there", "hi there"], DedupConfig(exact=False))[0].similarity == 1.0


def test_a_stricter_threshold_lets_a_looser_near_duplicate_through() -> None:
    a = conversation(seed=12)
    edited = edit_words(a, [20, 80, 140])
    assert find_duplicates([a, edited], DedupConfig(threshold=0.6))
    assert find_duplicates([a, edited], DedupConfig(threshold=0.99)) == []


def test_results_do_not_depend_on_how_texts_are_cut_into_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [conversation(seed=s % 7) if s % 3 else edit_words(conversation(seed=s % 7), [s]) for s in range(40)]
    whole = find_duplicates(texts, DedupConfig())
    monkeypatch.setattr(dedup, "_BLOCK_CHARS", 3000)  # a couple of texts per block, featurised on several threads
    assert find_duplicates(texts, DedupConfig()) == whole
    assert len(whole) > 20


def test_results_are_the_same_in_a_fresh_process_with_another_hash_seed() -> None:
    texts = [conversation(seed=s % 5) if s % 2 else edit_words(conversation(seed=s % 5), [s * 3]) for s in range(20)]
    here = [[m.index, m.kept_index, m.kind, m.similarity] for m in find_duplicates(texts, DedupConfig())]
    script = (
        "import json, sys\n"
        "from chatforge.config import DedupConfig\n"
        "from chatforge.data.dedup import find_duplicates\n"
        "texts = json.load(sys.stdin)\n"
        "matches = find_duplicates(texts, DedupConfig())\n"
        "print(json.dumps([[m.index, m.kept_index, m.kind, m.similarity] for m in matches]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(result.stdout) == here


def test_fast_word_split_agrees_with_normalise_for_dedup_on_unusual_text() -> None:
    rng = random.Random(0)
    alphabet = list("aZ9_ ,.'-()\t\n\u00a0\u2003ßİﬁ日本“”…🙂𝔘é\u0301") + ["\ud800"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        folded = text.casefold()
        code_points = np.frombuffer(folded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        starts, ends = dedup._normalised_word_spans(code_points)
        words = [folded[start : end + 1] for start, end in zip(starts.tolist(), ends.tolist())]
        assert " ".join(words) == normalise_for_dedup(text), repr(text)


def test_signatures_are_datasketch_minhashes_of_the_shingle_hashes() -> None:
    texts = ["one two three four five six seven", "short text", ""]
    _, signatures = dedup._featurise_block(texts, ngram=5, num_perm=64, with_signatures=True)
    folded = "\n".join(texts)
    code_points = np.frombuffer(folded.encode("utf-32-le"), dtype=np.uint32)
    starts, ends = dedup._normalised_word_spans(code_points)
    word_hashes = dedup._word_hashes(code_points, starts, ends)
    word_text = np.array([0] * 7 + [1] * 2)
    shingles, shingle_text = dedup._shingle_hashes(
        word_hashes, word_text, np.array([0, 7, 9]), np.array([7, 2, 0]), ngram=5
    )
    assert shingle_text.tolist() == [0, 0, 0, 1, 2]  # 3 five-grams, one short-text shingle, one for the empty text
    for text_index in range(3):
        expected = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=int)
        expected.update_batch(shingles[shingle_text == text_index].tolist())
        assert np.array_equal(expected.hashvalues, signatures[text_index])


def test_many_long_conversations_with_planted_duplicates_are_all_found() -> None:
    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(20000)])
    texts = [" ".join(vocabulary[rng.zipf(1.3, size=1000) % len(vocabulary)]) for _ in range(200)]
    planted: dict[int, int] = {}
    for source in range(0, 200, 10):
        planted[len(texts)] = source
        texts.append(texts[source].upper() if source % 20 else edit_words(texts[source], [source, source + 500]))
    matches = find_duplicates(texts, DedupConfig())
    assert {m.index: m.kept_index for m in matches} == planted
