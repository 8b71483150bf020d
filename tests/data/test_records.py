"""Records in and out of JSONL (chatforge.core.records): what every stage reads and writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatforge.core.records import make_record, read_jsonl, write_jsonl


def test_write_then_read_gives_the_records_back_and_a_lone_surrogate_becomes_a_question_mark(tmp_path: Path) -> None:
    records = [make_record([{"role": "user", "content": "héllo 👋"}, {"role": "assistant", "content": "hi"}],
                           source="chats.jsonl", line=1, meta={"category": "greeting"}, weight=2.0),
               {"id": "x", "messages": [{"role": "user", "content": "bad \ud800 char"}], "meta": {}}]
    path = tmp_path / "train.jsonl"
    assert write_jsonl(path, records) == 2
    assert path.read_text(encoding="utf-8").splitlines()[0].count("héllo 👋") == 1  # UTF-8, not \\u escapes
    read = list(read_jsonl(path))
    assert read[0] == records[0]
    assert read[1]["messages"][0]["content"] == "bad ? char"


def test_read_names_the_file_and_line_of_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": []}\n\n{"messages": ]}\n', encoding="utf-8")
    records = read_jsonl(path)
    assert next(records) == {"messages": []}  # lines before the bad one are read
    with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON \(Expecting value at column 14\)$"):
        next(records)


@pytest.mark.parametrize(("line", "reason"), [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ("[" * 100_000, "JSON nested too deeply to read"),
])
def test_read_rejects_a_line_that_is_not_a_record_with_a_one_line_reason(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "val.jsonl"
    path.write_text(f'{{"messages": []}}\n{line}\n', encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        list(read_jsonl(path))
    assert str(caught.value) == f"{path}:2: {reason}"
