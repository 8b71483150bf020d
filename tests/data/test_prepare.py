"""`chatforge prepare` end to end on a messy multi-format folder: nothing lost, nothing leaked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.config import FitConfig, PrepareConfig, SplitConfig
from chatforge.data.prepare import StrictModeError, prepare
from chatforge.core.records import read_jsonl
from tests.data.messy import write_messy_inputs

READ = 70  # 44 JSONL lines + 21 CSV rows + 3 transcript conversations + 2 YAML conversations
REJECTED = 6  # broken JSON, role 'bot', no assistant turn (x2), empty after cleaning, unlabeled transcript line
DUPLICATES = 2  # one exact, one near


def no_fit_config(**changes: object) -> PrepareConfig:
    return PrepareConfig(fit=FitConfig(enabled=False), **changes)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict]:
    root = tmp_path_factory.mktemp("prepare")
    planted = write_messy_inputs(root / "in")
    report = prepare([root / "in"], root / "out", no_fit_config())
    return root / "out", planted, report.counts


def test_prepare_accounts_for_every_record(prepared: tuple[Path, dict[str, str], dict]) -> None:
    out, _, counts = prepared
    assert counts["read"] == READ
    assert counts["rejected"] == REJECTED and counts["duplicates"] == DUPLICATES
    assert counts["read"] == counts["kept"] + counts["rejected"] + counts["duplicates"]
    lines = {name: list(read_jsonl(out / f"{name}.jsonl")) for name in ("train", "val", "test", "rejected", "duplicates")}
    assert len(lines["rejected"]) == REJECTED and len(lines["duplicates"]) == DUPLICATES
    assert len(lines["train"]) + len(lines["val"]) + len(lines["test"]) == counts["kept"]
    ids = [r["id"] for name in ("train", "val", "test") for r in lines[name]]
    assert len(ids) == len(set(ids))
    for record in lines["train"] + lines["val"] + lines["test"]:
        assert record["meta"]["source"].rpartition(":")[2].isdigit()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts
    assert {Path(i["path"]).name for i in manifest["inputs"]} == {"chats.jsonl", "faq.csv", "log.txt", "smalltalk.yml"}
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    assert "transformers" in manifest["versions"] and "dedup" in manifest["timings_s"]


def test_prepare_rejections_say_where_and_why(prepared: tuple[Path, dict[str, str], dict]) -> None:
    out, _, _ = prepared
    rejected = list(read_jsonl(out / "rejected.jsonl"))
    where = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejected}
    assert "malformed JSON" in where[("chats.jsonl", 8)]
    assert "role 'bot'" in where[("chats.jsonl", 9)]
    assert "no assistant turn" in where[("chats.jsonl", 10)]
    assert "after cleaning" in where[("chats.jsonl", 14)]
    assert "speaker label" in where[("log.txt", 8)]


def test_prepare_redacts_every_planted_value_from_every_output(prepared: tuple[Path, dict[str, str], dict]) -> None:
    out, planted, _ = prepared
    everything = "".join(p.read_text(encoding="utf-8") for p in out.iterdir() if p.suffix in {".jsonl", ".json", ".md"})
    for kind, value in planted.items():
        assert value not in everything, f"{kind} value leaked"
    card = json.loads((out / "card.json").read_text())
    for kind in planted:
        assert card["pii_replaced"].get(kind, 0) >= 1, kind
    train_text = (out / "train.jsonl").read_text() + (out / "val.jsonl").read_text() + (out / "test.jsonl").read_text()
    assert "[EMAIL]" in train_text + (out / "duplicates.jsonl").read_text()


def test_prepare_removes_exact_and_near_duplicates_keeping_the_first(prepared: tuple[Path, dict[str, str], dict]) -> None:
    out, _, _ = prepared
    duplicates = list(read_jsonl(out / "duplicates.jsonl"))
    assert {d["kind"] for d in duplicates} == {"exact", "near"}
    kept_ids = {r["id"] for name in ("train", "val", "test") for r in read_jsonl(out / f"{name}.jsonl")}
    assert all(d["duplicate_of"] in kept_ids for d in duplicates)
    assert {d["meta"]["source"].rpartition(":")[2] for d in duplicates} == {"12", "13"}


def test_prepare_cleans_html_and_punctuation(prepared: tuple[Path, dict[str, str], dict]) -> None:
    out, _, _ = prepared
    records = [r for name in ("train", "val", "test") for r in read_jsonl(out / f"{name}.jsonl")]
    (card_answer,) = [r["messages"][1]["content"] for r in records if r["meta"]["source"].endswith("chats.jsonl:2")]
    assert "<b>" not in card_answer and "&amp;" not in card_answer and "!!!!" not in card_answer


def test_prepare_writes_card_and_histogram(prepared: tuple[Path, dict[str, str], dict]) -> None:
    out, _, counts = prepared
    card_md = (out / "card.md").read_text()
    assert f"read {counts['read']} = kept {counts['kept']}" in card_md
    assert (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_split_sizes_follow_ratios(tmp_path: Path) -> None:
    write_messy_inputs(tmp_path / "in")
    cfg = no_fit_config(split=SplitConfig(ratios=(0.7, 0.15, 0.15)))
    counts = prepare([tmp_path / "in"], tmp_path / "out", cfg).counts
    for name, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(counts[f"{name}_sources"] - ratio * counts["kept"]) <= 1


def test_strict_mode_stops_at_first_invalid_record_with_file_and_line(tmp_path: Path) -> None:
    write_messy_inputs(tmp_path / "in")
    with pytest.raises(StrictModeError, match=r"chats\.jsonl:8: malformed JSON"):
        prepare([tmp_path / "in" / "chats.jsonl"], tmp_path / "out", no_fit_config(strict=True))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_prepare_prints_summary_and_cli_errors_are_one_line(tmp_path: Path) -> None:
    write_messy_inputs(tmp_path / "in")
    done = run_cli("prepare", "in", "--out", "out", "--no-fit", "--split", "80/10/10", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dataset ready" in done.stdout and f"read {READ}" in done.stdout
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x00\x00")
    for args, message in [
        (("prepare", "bin.jsonl", "--out", "o2"), "binary file"),
        (("prepare", "missing.csv", "--out", "o2"), "no such file"),
        (("prepare", "in", "--out", "o2", "--split", "1/2"), "expected three numbers"),
        (("prepare", "in/chats.jsonl", "--out", "o2", "--strict", "--no-fit"), "chats.jsonl:8: malformed JSON"),
    ]:
        failed = run_cli(*args, cwd=tmp_path)
        assert failed.returncode == 2, (args, failed.stderr)
        assert message in failed.stderr and "Traceback" not in failed.stderr


def test_cli_reads_project_file_and_init_writes_a_valid_one(tmp_path: Path) -> None:
    assert run_cli("init", cwd=tmp_path).returncode == 0
    from chatforge.config import ProjectConfig

    assert ProjectConfig.load(tmp_path / "chatforge.yaml") == ProjectConfig()
    (tmp_path / "chatforge.yaml").write_text("prepare:\n  dedupe: {}\n")
    failed = run_cli("prepare", "x", "--out", "o", cwd=tmp_path)
    assert failed.returncode == 2 and "prepare.dedupe" in failed.stderr


def test_prepare_with_fit_splits_long_conversations_and_keeps_pieces_in_one_split(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    write_messy_inputs(tmp_path / "in")
    long_turns = []
    for turn in range(12):
        long_turns += [{"role": "user", "content": f"Question {turn}: how do I fix problem number {turn} on my router?"},
                       {"role": "assistant", "content": f"For problem {turn}, unplug the router, wait, and plug it back in."}]
    with (tmp_path / "in" / "chats.jsonl").open("a") as handle:
        handle.write(json.dumps({"messages": long_turns}) + "\n")
    cfg = PrepareConfig(fit=FitConfig(model=str(tiny_tokenizer_dir), max_tokens=96, overflow="split"))
    report = prepare([tmp_path / "in"], tmp_path / "out", cfg)
    counts = report.counts
    assert counts["read"] == READ + 1
    assert counts["read"] == counts["kept"] + counts["rejected"] + counts["duplicates"]
    assert counts["pieces_from_long_conversations"] >= 2
    pieces_by_split = {}
    for name in ("train", "val", "test"):
        for record in read_jsonl(tmp_path / "out" / f"{name}.jsonl"):
            if "group" in record["meta"]:
                pieces_by_split.setdefault(record["meta"]["group"], set()).add(name)
                assert record["messages"][-1]["role"] == "assistant"
    assert pieces_by_split and all(len(splits) == 1 for splits in pieces_by_split.values())
    stats = report.card["tokens"]["stats"]
    assert 0 < stats["max"] <= 96 and report.card["tokens"]["estimated_train_tokens_per_epoch"] > 0
