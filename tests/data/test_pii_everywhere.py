"""No PII in any file `prepare` writes, nor in its log: meta, keys, categories, raw lines, file names; and a property
test over generated records with PII planted in random places."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatforge.config import FitConfig, PrepareConfig
from chatforge.core.pii import Redactor
from chatforge.data.prepare import prepare
from chatforge.data.scrub import Scrubber, json_unescape
from tests.data.messy import PLANTED_PII

# (what is written into the input, the part that must never come out)
PLANTED = [
    ("jane.doe@example.com", "jane.doe@example.com"),
    ("+44 20 7946 0958", "7946 0958"),
    ("4111 1111 1111 1111", "4111 1111 1111 1111"),
    ("GB82 WEST 1234 5698 7654 32", "5698 7654"),
    ("192.168.10.77", "192.168.10.77"),
    ("123-45-6789", "123-45-6789"),
    (PLANTED_PII["API_KEY"], PLANTED_PII["API_KEY"]),
    ("postgres://admin:hunter2secret@db.example.com/prod", "hunter2secret"),
]
SECRETS = [secret for _, secret in PLANTED]


def everything_written(out: Path, log_lines: list[str]) -> str:
    texts = [p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()]
    return "\n".join(texts + log_lines)


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def chat(user: str, assistant: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def test_pii_outside_message_text_never_reaches_any_output(tmp_path: Path) -> None:
    email, phone, card, iban, ip, ssn, key, url = (value for value, _ in PLANTED)
    src = tmp_path / "in"
    src.mkdir()
    lines = [
        json.dumps(chat("hello", "hi", meta={"customer": {"email": email, "phones": [phone]}, email: "owner"})),
        json.dumps(chat("hello", "hi", meta={"customer": {"email": email}})),  # an exact duplicate
        json.dumps(chat("where is my order", "on its way", meta={"tags": [{"note": f"card {card}"}]})),
        '{"messages": [{"role": "user", "content": "mail jane.doe\\u0040example.com or ' + ssn + '"}, broken',
        json.dumps({"conversation": "x", email: 1, "nested": {key: [url]}}),  # valid JSON, not a record
        json.dumps({"messages": [{"role": email, "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": f"only {iban}"}]}),
    ]
    (src / f"export-{ip}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (src / "faq.csv").write_text(f"question,answer,category\nhow to pay?,in the app,{email}\n", encoding="utf-8")
    table = pa.table({"messages": [chat("q", "a")["messages"]], "meta": [{"owner": email, "ssn": ssn}]})
    pq.write_table(table, src / "chats.parquet")
    log_lines: list[str] = []
    report = prepare([src], tmp_path / "out", PrepareConfig(fit=FitConfig(enabled=False)), log=log_lines.append)

    counts = report.counts
    assert counts["read"] == counts["kept"] + counts["rejected"] + counts["duplicates"] == 9
    assert (counts["rejected"], counts["duplicates"]) == (4, 1)
    written = everything_written(tmp_path / "out", log_lines)
    assert leaked(written) == []
    rejected = (tmp_path / "out" / "rejected.jsonl").read_text()
    assert "mail [EMAIL] or [SSN]" in rejected  # the raw line, unescaped then redacted
    assert "[EMAIL]" in (tmp_path / "out" / "card.json").read_text() or "[EMAIL]" in written
    assert "export-[IP_ADDRESS].jsonl" in (tmp_path / "out" / "manifest.json").read_text()


def test_json_unescape_undoes_escapes_in_one_pass() -> None:
    assert json_unescape(r"a\u0040b.io \"q\" \\u0040 \ud83d\ude00 \ud800 \n") == 'a@b.io "q" \\u0040 \U0001f600 \ufffd \n'


SAFE_TEXT = st.text(alphabet=st.sampled_from(list("abcdefghij klmnop,.!?")), min_size=0, max_size=12)
PII_VALUE = st.sampled_from([value for value, _ in PLANTED])


def maybe_planted(text_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Text, sometimes with a PII value planted between spaces."""
    planted = st.tuples(SAFE_TEXT, PII_VALUE, SAFE_TEXT).map(lambda parts: f"{parts[0]} {parts[1]} {parts[2]}")
    return st.one_of(text_strategy, planted)


META_VALUES = st.recursive(
    st.one_of(maybe_planted(SAFE_TEXT), st.integers(), st.none()),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(maybe_planted(SAFE_TEXT), children, max_size=3)),
    max_leaves=6,
)


@st.composite
def input_lines(draw: st.DrawFn) -> str:
    """One JSONL line: a valid conversation, an invalid one, or a malformed line; PII anywhere."""
    kind = draw(st.sampled_from(["chat", "chat", "chat", "bad role", "no answer", "malformed", "not a record"]))
    text = maybe_planted(SAFE_TEXT)
    if kind == "malformed":
        return '{"messages": [{"content": "' + draw(text).replace("@", "\\u0040") + '"'
    if kind == "not a record":
        return json.dumps({draw(text): draw(META_VALUES)})
    turns = draw(st.integers(min_value=1, max_value=3))
    messages = []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
    if kind == "bad role":
        messages[0]["role"] = draw(text)
    if kind == "no answer":
        messages = messages[:1]
    return json.dumps({"messages": messages, "meta": draw(st.dictionaries(text, META_VALUES, max_size=3))})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(input_lines(), min_size=1, max_size=8))
def test_property_no_planted_value_in_any_output_and_every_record_accounted_for(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        log_lines: list[str] = []
        cfg = PrepareConfig(format="openai", fit=FitConfig(enabled=False), workers=1)  # a file may hold no record
        counts = prepare([root / "in.jsonl"], root / "out", cfg, log=log_lines.append).counts
        assert counts["read"] == len(lines) == counts["kept"] + counts["rejected"] + counts["duplicates"]
        written = {name: (root / "out" / f"{name}.jsonl").read_text().splitlines()
                   for name in ("train", "val", "test", "rejected", "duplicates")}
        assert len(written["train"]) + len(written["val"]) + len(written["test"]) == counts["kept"]
        assert (len(written["rejected"]), len(written["duplicates"])) == (counts["rejected"], counts["duplicates"])
        assert leaked(everything_written(root / "out", log_lines)) == []


def test_keys_redacted_alike_keep_every_value() -> None:
    tree = Scrubber(Redactor()).tree({"a@b.io": 1, "c@d.io": {"e@f.io": [2, b"\x00\x01"]}, "x": float("nan")})
    assert tree == {"[EMAIL]": 1, "[EMAIL] #2": {"[EMAIL]": [2, "[2 bytes]"]}, "x": "nan"}
