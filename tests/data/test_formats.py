"""Each input format is read from a small fixture into OpenAI chat records with their source line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.config import FormatOptions
from chatforge.data.formats import InputError, Rejection, detect_format, read_file
from chatforge.data.validate import validate_messages


def read_all(path: Path, fmt: str | None = None, options: FormatOptions | None = None) -> list:
    return list(read_file(path, fmt or detect_format(path), options or FormatOptions()))


def test_openai_jsonl_keeps_messages_weight_and_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "weight": 0.5},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert detect_format(path) == "openai"
    first, second = read_all(path)
    assert first["messages"][1]["content"] == "hello" and first["weight"] == 0.5
    assert first["meta"]["source"] == f"{path}:1"
    assert second["meta"]["source"] == f"{path}:3"
    assert second["messages"][2]["content"] == "4"


def test_sharegpt_maps_speakers_to_roles(tmp_path: Path) -> None:
    path = tmp_path / "share.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))
    assert detect_format(path) == "sharegpt"
    (record,) = read_all(path)
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]


def test_alpaca_joins_instruction_and_input(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Translate", "input": "bonjour", "output": "hello"}) + "\n")
    assert detect_format(path) == "alpaca"
    (record,) = read_all(path)
    assert record["messages"] == [{"role": "user", "content": "Translate\n\nbonjour"},
                                  {"role": "assistant", "content": "hello"}]


def test_csv_and_tsv_question_answer_with_category_and_real_line_numbers(tmp_path: Path) -> None:
    csv_path = tmp_path / "faq.csv"
    csv_path.write_text('Question,Answer,category\n"How do I\nreset?",Click reset.,account\nPrice?,10 EUR,billing\n')
    tsv_path = tmp_path / "faq.tsv"
    tsv_path.write_text("prompt\tresponse\nhi\thello\n")
    first, second = read_all(csv_path)
    assert first["messages"][0]["content"] == "How do I\nreset?" and first["meta"]["category"] == "account"
    assert second["meta"]["source"].endswith(":4")  # the quoted newline makes row 1 span lines 2-3
    (row,) = read_all(tsv_path)
    assert row["messages"][1]["content"] == "hello"


def test_csv_column_names_are_configurable(tmp_path: Path) -> None:
    path = tmp_path / "tickets.csv"
    path.write_text("ticket_text,agent_reply\nmy printer,turn it on\n")
    with pytest.raises(InputError, match="no question/answer columns"):
        read_all(path)
    options = FormatOptions(question_columns=["ticket_text"], answer_columns=["agent_reply"])
    (record,) = read_all(path, options=options)
    assert record["messages"][0]["content"] == "my printer"


def test_chatterbot_yaml_with_category_and_line(tmp_path: Path) -> None:
    path = tmp_path / "ai.yml"
    path.write_text("categories:\n- AI\nconversations:\n- - What is AI?\n  - A field of study.\n- - Are you 1?\n  - yes\n")
    assert detect_format(path) == "chatterbot"
    first, second = read_all(path)
    assert first["messages"][1] == {"role": "assistant", "content": "A field of study."}
    assert first["meta"] == {"category": "ai", "source": f"{path}:4"}
    assert second["messages"][0]["content"] == "Are you 1?"


def test_transcript_with_configurable_labels_and_continuations(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("User: hello\nAgent: hi, how can I help?\nUser: my bill\nis wrong\nAgent: let me check\n\n"
                    "Customer: refund?\nSupport: done\n\nno label here\n")
    records = read_all(path)
    assert len(records) == 3
    first, second, third = records
    assert first["messages"][2]["content"] == "my bill\nis wrong"
    assert second["meta"]["source"].endswith(":7")
    assert isinstance(third, Rejection) and third.line == 10 and "speaker label" in third.reason
    custom = read_all(path, options=FormatOptions(user_labels=["Customer"], assistant_labels=["Support"]))
    assert custom[1]["messages"] == [{"role": "user", "content": "refund?"}, {"role": "assistant", "content": "done"}]


def test_parquet_with_messages_or_question_answer(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "m.parquet")
    pq.write_table(pa.table({"question": ["q"], "answer": ["r"]}), tmp_path / "qa.parquet")
    (record,) = read_all(tmp_path / "m.parquet")
    assert record["messages"][1]["content"] == "b" and record["meta"]["source"].endswith(":1")
    (qa,) = read_all(tmp_path / "qa.parquet")
    assert qa["messages"][0]["content"] == "q"


def test_malformed_json_line_is_rejected_with_line_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    path.write_text(good + "\n{\"messages\": [oops\n" + good + "\n")
    items = read_all(path)
    assert len(items) == 3
    assert isinstance(items[1], Rejection) and items[1].line == 2 and "malformed JSON" in items[1].reason


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "file is empty"),
        ("blank.csv", b"  \n\n", "only whitespace"),
        ("blob.jsonl", b"\x00\x01\x02binary\x00", "binary file"),
        ("latin.txt", "caf\xe9 User: x".encode("latin-1") + b"\n", "not UTF-8"),
        ("data.xml", b"<a>1</a>", "unknown format"),
        ("other.json", b'{"text": "no chat here"}\n', "cannot tell the format"),
    ],
)
def test_unreadable_files_give_one_clear_line(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as excinfo:
        read_all(path)
    text = str(excinfo.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "no messages"),
        ([{"role": "bot", "content": "x"}], "message 1 has role 'bot'; expected system, user or assistant"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}], "message 1 (user) is empty"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "only the first"),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}], "must alternate"),
        ([{"role": "assistant", "content": "a"}], "user was expected"),
        ([{"role": "user", "content": "q"}], "does not end with an assistant"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "content is int"),
    ],
)
def test_validation_names_the_problem(messages: list, reason: str) -> None:
    assert reason in (validate_messages(messages) or "")


def test_valid_conversation_with_system_passes() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert validate_messages(messages) is None
