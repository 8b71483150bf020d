"""Cleaning tidies Unicode, control characters, whitespace, HTML and punctuation, and leaves placeholders alone."""

from __future__ import annotations

import pickle

import pytest

from chatforge.config import CleanConfig
from chatforge.data.clean import clean_text, make_cleaner

DEFAULT = CleanConfig()


def test_nfkc_folds_full_width_letters_and_ligatures() -> None:
    assert clean_text("ＡＢＣ ｆｕｌｌ ﬁle ﬂow", DEFAULT) == "ABC full file flow"


def test_control_characters_go_but_tabs_and_newlines_stay() -> None:
    assert clean_text("a\x00b\x07c\u200bd\ufeffe", DEFAULT) == "abcde"
    assert clean_text("code:\n\tindented", DEFAULT) == "code:\n\tindented"


def test_newlines_are_normalised_and_blank_lines_limited_to_one() -> None:
    assert clean_text("one\r\ntwo\rthree\n\n\n\n\nfour", DEFAULT) == "one\ntwo\nthree\n\nfour"


def test_spaces_collapse_inside_lines_but_indentation_stays() -> None:
    assert clean_text("  hello    world \t again  \n    indented   line   ", DEFAULT) == (
        "hello world again\n    indented line"
    )


def test_html_tags_are_stripped_keeping_their_text_and_line_breaks() -> None:
    assert clean_text("<p>Hello <b>there</b></p><p>Line<br>break</p>", DEFAULT) == "Hello there\n\nLine\nbreak"
    assert clean_text('<a href="https://x.test">click</a><script>alert(1)</script><!-- note -->', DEFAULT) == "click"
    assert clean_text("<ul><li>one</li><li>two</li></ul>", DEFAULT) == "one\ntwo"


def test_html_entities_are_decoded() -> None:
    assert clean_text("fish &amp; chips, it&#39;s&nbsp;here &lt;3 &#x41;", DEFAULT) == "fish & chips, it's here <3 A"


def test_text_that_only_looks_like_markup_is_kept() -> None:
    looks_like_markup = ["a < b and c > d", "I <3 this", "x<y and y>z", "List<String>, Map<K, V>", "AT&T, R&D", "&notice"]
    for text in looks_like_markup:
        assert clean_text(text, DEFAULT) == text


def test_punctuation_runs_are_collapsed() -> None:
    assert clean_text("wow!!!!!!", DEFAULT) == "wow!!!"
    assert clean_text("what??????", DEFAULT) == "what???"
    assert clean_text("really?!?!?!?!", DEFAULT) == "really?!?"
    assert clean_text("wait........ ok,,, sure", DEFAULT) == "wait... ok, sure"
    assert clean_text("fine!!! ok... why??", DEFAULT) == "fine!!! ok... why??"


def test_placeholders_survive_every_step() -> None:
    everything = CleanConfig(spelling=True, capitalize=True)
    text = "mail [EMAIL] or call [PHONE]!!!!! card [CREDIT_CARD]. [PERSON] said teh [IP_ADDRESS] is down"
    cleaned = clean_text(text, everything)
    for placeholder in ["[EMAIL]", "[PHONE]", "[CREDIT_CARD]", "[PERSON]", "[IP_ADDRESS]"]:
        assert placeholder in cleaned
    assert cleaned == "Mail [EMAIL] or call [PHONE]!!! Card [CREDIT_CARD]. [PERSON] said the [IP_ADDRESS] is down"


@pytest.mark.parametrize(
    ("switch", "text"),
    [
        ("unicode_nfkc", "ﬁle ＡＢＣ"),
        ("strip_html", "<b>bold</b> &amp; more"),
        ("collapse_punctuation", "Wow!!!!!! Wait......"),
        ("spelling", "The teh order"),
        ("capitalize", "hello. there"),
    ],
)
def test_each_switch_off_leaves_its_aspect_alone(switch: str, text: str) -> None:
    settings = {"unicode_nfkc": True, "strip_html": True, "collapse_punctuation": True, "spelling": True,
                "capitalize": True, switch: False}
    assert clean_text(text, CleanConfig(**settings)) == text


def test_disabled_cleaner_returns_text_unchanged() -> None:
    messy = "  <b>x</b>\x00!!!!!  "
    assert clean_text(messy, CleanConfig(enabled=False)) == messy


def test_spelling_correction_fixes_common_typos_but_not_names_urls_or_codes() -> None:
    cleaner = make_cleaner(CleanConfig(spelling=True))
    assert cleaner("teh parcel did not recieve") == "the parcel did not receive"
    untouched = "Teh iPhone at https://exmaple.test/teh or teh@exmaple.test, code abc123x, file teh.txt"
    assert cleaner(untouched) == untouched


def test_capitalize_starts_each_sentence_with_a_capital() -> None:
    cleaner = make_cleaner(CleanConfig(capitalize=True))
    assert cleaner("hi. my order is late! can you help? e.g. check it") == (
        "Hi. My order is late! Can you help? E.g. check it"
    )
    assert cleaner("wait... what. https://x.test is down") == "Wait... what. https://x.test is down"


def test_cleaner_pickles_for_worker_processes() -> None:
    cleaner = make_cleaner(CleanConfig(spelling=True))
    assert pickle.loads(pickle.dumps(cleaner))("teh end!!!!") == "the end!!!"


def test_missing_spell_checker_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "spellchecker", None)  # makes `import spellchecker` raise ImportError
    with pytest.raises(ImportError, match=r"chatforge\[spell\]"):
        make_cleaner(CleanConfig(spelling=True))


def test_empty_text_stays_empty() -> None:
    assert clean_text("", DEFAULT) == ""
    assert clean_text(" \n\t ", DEFAULT) == ""
