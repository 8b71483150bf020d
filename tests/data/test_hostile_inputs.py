"""`prepare` on real and hostile inputs: no crash, nothing lost, clear one-line errors, a failed run changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.config import FitConfig, PrepareConfig, ValidateConfig
from chatforge.data import card as card_module
from chatforge.data.formats import MAX_JSON_DEPTH, InputError
from chatforge.data.prepare import prepare
from chatforge.core.records import read_jsonl

OUTPUT_NAMES = ("train", "val", "test", "rejected", "duplicates")


def no_fit(**changes: object) -> PrepareConfig:
    return PrepareConfig(fit=FitConfig(enabled=False), **changes)


def chat(*turns: str, roles: str = "") -> dict:
    roles = roles or "ua" * len(turns)
    names = {"u": "user", "a": "assistant", "s": "system"}
    return {"messages": [{"role": names[r], "content": t} for r, t in zip(roles, turns)]}


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def outputs(out: Path) -> dict[str, list[dict]]:
    return {name: list(read_jsonl(out / f"{name}.jsonl")) for name in OUTPUT_NAMES}


def assert_identity(counts: dict) -> None:
    assert counts["read"] == counts["kept"] + counts["rejected"] + counts["duplicates"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def test_a_split_piece_that_cannot_fit_leaves_its_record_kept_once(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    long_question = " ".join(f"word{i % 37}" for i in range(300))
    records = [chat("hi", "hello, how can I help?", long_question, "here is the answer to that"),
               chat("a normal question", "a normal answer")]
    cfg = PrepareConfig(fit=FitConfig(model=str(tiny_tokenizer_dir), max_tokens=128), dedup={"near": False})
    report = prepare([write_lines(tmp_path / "chats.jsonl", records)], tmp_path / "out", cfg)
    counts = report.counts
    assert_identity(counts)
    assert (counts["read"], counts["kept"], counts["rejected"], counts["pieces_dropped"]) == (2, 2, 0, 1)
    [piece] = outputs(tmp_path / "out")["rejected"]
    assert "piece of a kept conversation" in piece["reason"] and "no room" in piece["reason"]
    assert piece["record"]["meta"]["group"] and "pieces of kept long conversations dropped" in (tmp_path / "out" / "card.md").read_text()


def test_trailing_user_turns_are_trimmed_by_default_and_counted(tmp_path: Path) -> None:
    records = [chat("my router blinks", "unplug it for ten seconds", "thanks, bye", roles="uau"),
               chat("one", "two", "three", "four", roles="uauu"),
               chat("only a question", roles="u"),
               chat("a question", "an answer")]
    report = prepare([write_lines(tmp_path / "log.jsonl", records)], tmp_path / "out", no_fit())
    counts, written = report.counts, outputs(tmp_path / "out")
    assert (counts["read"], counts["kept"], counts["rejected"], counts["trimmed"]) == (4, 3, 1, 2)
    kept = [r for name in ("train", "val", "test") for r in written[name]]
    trimmed = {r["messages"][0]["content"]: r["meta"]["trimmed_turns"] for r in kept if "trimmed_turns" in r["meta"]}
    assert trimmed == {"my router blinks": 1, "one": 2}
    assert all(r["messages"][-1]["role"] == "assistant" for r in kept)
    [rejected] = written["rejected"]
    assert "no assistant turn" in rejected["reason"]
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["counts"]["trimmed"] == 2 and "trimming trailing user turns" in (tmp_path / "out" / "card.md").read_text()


def test_trailing_user_reject_keeps_the_old_rule(tmp_path: Path) -> None:
    records = [chat("my router blinks", "unplug it", "thanks, bye", roles="uau"), chat("q", "a")]
    cfg = no_fit(validate=ValidateConfig(trailing_user="reject"))
    report = prepare([write_lines(tmp_path / "log.jsonl", records)], tmp_path / "out", cfg)
    assert (report.counts["kept"], report.counts["rejected"], report.counts["trimmed"]) == (1, 1, 0)
    [rejected] = outputs(tmp_path / "out")["rejected"]
    assert rejected["reason"] == "conversation does not end with an assistant message"


def test_card_lists_every_rejection_reason_with_counts_that_add_up(tmp_path: Path) -> None:
    records = [chat("q", roles="u"), chat("q2", roles="u"), {"messages": "nope"}, chat("q", "a")]
    path = write_lines(tmp_path / "c.jsonl", records)
    with path.open("a") as handle:
        handle.write("{broken\n")
    report = prepare([path], tmp_path / "out", no_fit())
    reasons = report.card["rejection_reasons"]
    assert sum(reasons.values()) == report.counts["rejected"] == 4
    assert reasons["no assistant turn to end on (a conversation needs at least one answer)"] == 2
    card_md = (tmp_path / "out" / "card.md").read_text()
    assert all(f"| {reason} | {n} |" in card_md for reason, n in reasons.items())


def test_a_yaml_alias_bomb_is_refused_with_file_and_line(tmp_path: Path) -> None:
    bomb = "categories:\n- &a [x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb += f"- &{level} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}]\n"
    bomb += "- [*i]\nconversations:\n- - hi\n  - hello\n"
    path = tmp_path / "bomb.yml"
    path.write_text(bomb)
    with pytest.raises(InputError, match=r"bomb\.yml:3: YAML alias '\*a' refused"):
        prepare([path], tmp_path / "out", no_fit())
    done = run_cli("prepare", "bomb.yml", "--out", "out", "--no-fit", cwd=tmp_path)
    assert done.returncode == 2 and "bomb.yml:3: YAML alias" in done.stderr and "Traceback" not in done.stderr


def test_a_large_csv_field_is_read_and_one_over_the_record_limit_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "faq.csv"
    path.write_text("question,answer\nshort,one\nbig," + "y" * 200_000 + "\nlast,row\n")
    report = prepare([path], tmp_path / "out", no_fit())
    assert report.counts["read"] == 3 and report.counts["kept"] == 3  # 200 KB is under the 1 MB default
    cfg = no_fit(validate=ValidateConfig(max_record_bytes=100_000))
    with pytest.raises(InputError, match=r"faq\.csv:3: field larger than field limit \(100000\)"):
        prepare([path], tmp_path / "out2", cfg)


def test_json_nested_100000_deep_is_a_rejected_record_not_a_recursion_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "deep.jsonl", [chat("q", "a")])
    with path.open("a") as handle:
        handle.write("[" * 100_000 + "\n")
        handle.write(json.dumps({"messages": chat("q2", "a2")["messages"], "meta": {"x": [[[[1]]]] * 30}}) + "\n")
        nested: object = "deep"
        for _ in range(MAX_JSON_DEPTH + 5):
            nested = [nested]
        handle.write(json.dumps({"messages": chat("q3", "a3")["messages"], "meta": {"x": nested}}) + "\n")
    report = prepare([path], tmp_path / "out", no_fit())
    assert (report.counts["read"], report.counts["kept"], report.counts["rejected"]) == (4, 2, 2)
    rejected = outputs(tmp_path / "out")["rejected"]
    assert [r["line"] for r in rejected] == [2, 4]
    assert all(f"nested deeper than {MAX_JSON_DEPTH}" in r["reason"] and r["record"] is None for r in rejected)


def test_a_record_over_max_record_bytes_is_rejected_without_its_content(tmp_path: Path) -> None:
    huge = chat("q", "x" * 5000)
    path = write_lines(tmp_path / "c.jsonl", [chat("q", "a"), huge])
    (tmp_path / "t.txt").write_text("User: hi\nAgent: " + "y" * 5000 + "\n\nUser: ok\nAgent: fine\n")
    report = prepare([path, tmp_path / "t.txt"], tmp_path / "out", no_fit(validate=ValidateConfig(max_record_bytes=4096)))
    assert (report.counts["read"], report.counts["kept"], report.counts["rejected"]) == (4, 2, 2)
    rejected = outputs(tmp_path / "out")["rejected"]
    assert all("over validate.max_record_bytes 4,096" in r["reason"] and r["record"] is None for r in rejected)
    assert "x" * 100 not in (tmp_path / "out" / "rejected.jsonl").read_text()


def test_a_parquet_bytes_column_is_a_clear_error_and_unused_ones_are_ignored(tmp_path: Path) -> None:
    messages = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    pq.write_table(pa.table({"messages": messages, "blob": pa.array([b"\x00\x01"], pa.binary())}), tmp_path / "ok.parquet")
    report = prepare([tmp_path / "ok.parquet"], tmp_path / "out", no_fit())
    assert report.counts["kept"] == 1  # a byte column prepare does not read is never loaded
    pq.write_table(pa.table({"question": ["q"], "answer": pa.array([b"a"], pa.binary())}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: column 'answer' has type binary"):
        prepare([tmp_path / "bad.parquet"], tmp_path / "out2", no_fit())
    done = run_cli("prepare", "bad.parquet", "--out", "out3", "--no-fit", cwd=tmp_path)
    assert done.returncode == 2 and "column 'answer' has type binary" in done.stderr and "Traceback" not in done.stderr


def test_parquet_meta_with_dates_is_written_as_text(tmp_path: Path) -> None:
    import datetime

    table = pa.table({"question": ["q"], "answer": ["a"], "category": [datetime.date(2024, 5, 1)]})
    pq.write_table(table, tmp_path / "d.parquet")
    report = prepare([tmp_path / "d.parquet"], tmp_path / "out", no_fit())
    [record] = [r for name in ("train", "val", "test") for r in outputs(tmp_path / "out")[name]]
    assert report.counts["kept"] == 1 and record["meta"]["category"] == "2024-05-01"


def test_lone_surrogate_escapes_neither_crash_nor_reach_the_output(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "bad \\ud800 text"}, '
                    '{"role": "assistant", "content": "ok"}], "meta": {"k": "\\udfff"}}\n', encoding="utf-8")
    for clean in (True, False):
        out = tmp_path / f"out-{clean}"
        report = prepare([path], out, no_fit(clean={"enabled": clean}))
        [record] = [r for name in ("train", "val", "test") for r in outputs(out)[name]]
        assert report.counts["kept"] == 1 and record["messages"][0]["content"] == "bad \ufffd text"
        assert record["meta"]["k"] == "\ufffd"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_run_that_fails_while_writing_leaves_the_previous_dataset_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_lines(tmp_path / "a.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(8)])
    prepare([first], tmp_path / "out", no_fit())
    before = snapshot(tmp_path / "out")
    assert len(before) == 9 and before["train.jsonl"]

    def fail_mid_write(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    second = write_lines(tmp_path / "b.jsonl", [chat(f"other {i}", f"reply {i}") for i in range(3)])
    monkeypatch.setattr(card_module, "write_token_histogram", fail_mid_write)  # after the JSONL files are written
    with pytest.raises(OSError, match="disk full"):
        prepare([second], tmp_path / "out", no_fit())
    assert snapshot(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]  # no staging folder left

    monkeypatch.undo()
    prepare([second], tmp_path / "out", no_fit())  # a successful run replaces the dataset as a whole
    assert len(outputs(tmp_path / "out")["train"]) + len(outputs(tmp_path / "out")["val"]) + len(
        outputs(tmp_path / "out")["test"]) == 3


def test_out_folder_with_other_files_keeps_them(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "NOTES.md").write_text("mine")
    prepare([write_lines(tmp_path / "a.jsonl", [chat("q", "a")])], tmp_path / "out", no_fit())
    assert (tmp_path / "out" / "NOTES.md").read_text() == "mine" and (tmp_path / "out" / "manifest.json").exists()


def test_balance_cap_removes_split_conversations_whole(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    records = []
    for i in range(12):  # long 'billing' conversations that fit splits into pieces, and a few short 'outage' ones
        turns: list[str] = []
        for k in range(6):
            turns += [f"Invoice question {i}.{k}: why was I charged twice for plan {k}?",
                      f"Answer {i}.{k}: the second charge for plan {k} is a hold that disappears in a few days."]
        records.append({**chat(*turns), "meta": {"category": "billing"}})
    records += [{**chat(f"is outage {i} fixed?", f"yes, outage {i} is fixed"), "meta": {"category": "outage"}}
                for i in range(3)]
    cfg = PrepareConfig(fit=FitConfig(model=str(tiny_tokenizer_dir), max_tokens=96), balance={"enabled": True},
                        dedup={"near": False})
    report = prepare([write_lines(tmp_path / "c.jsonl", records)], tmp_path / "out", cfg)
    counts = report.counts
    assert_identity(counts)
    assert counts["pieces_from_long_conversations"] > 0 and counts["capped_by_balance"] == 9
    written = outputs(tmp_path / "out")
    kept_groups = {r["meta"].get("group", r["id"]) for name in ("train", "val", "test") for r in written[name]}
    capped_groups = {r["record"]["meta"].get("group") for r in written["rejected"]}
    assert len(kept_groups) == counts["kept"] == 6 and not kept_groups & capped_groups
    assert len(written["rejected"]) == counts["rejected"] + counts["pieces_dropped"] + counts["pieces_capped"]
