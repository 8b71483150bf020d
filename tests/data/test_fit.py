"""Fit to context: token counts as the chat template renders them; split, truncate or drop what is too long."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from chatforge.config import FitConfig
from chatforge.data.fit import MIN_ANSWER_TOKENS, fit_records, token_stats
from chatforge.data.token_counting import measure_template_costs
from chatforge.models.templates import ensure_chat_template
from tests.tiny_models import build_tiny_tokenizer, tiny_chat_text


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    sentencepiece = build_tiny_tokenizer(tmp_path_factory.mktemp("sentencepiece"), style="sentencepiece")
    return {"bytelevel": tiny_tokenizer_dir, "sentencepiece": sentencepiece}


@pytest.fixture()
def tokenizer(tokenizer_dirs: dict[str, Path]):
    return AutoTokenizer.from_pretrained(tokenizer_dirs["bytelevel"])


def exact_tokens(tokenizer, record: dict) -> int:
    return len(tokenizer.apply_chat_template(record["messages"], return_dict=False))


def random_conversations(count: int, seed: int = 0, max_exchanges: int = 6) -> list[dict]:
    """Conversations from the tiny corpus, with and without a system message, plus awkward whitespace."""
    rng = random.Random(seed)
    lines = tiny_chat_text().splitlines()

    def text(max_lines: int) -> str:
        body = " ".join(rng.choice(lines) for _ in range(rng.randint(1, max_lines)))
        return rng.choice(["", " ", "\n"]) + body + rng.choice(["", " ", "  ", "\n\n"]) + rng.choice(["", "a  b"])

    records = []
    for i in range(count):
        messages = [{"role": "system", "content": text(1)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, max_exchanges)):
            messages += [{"role": "user", "content": text(2)}, {"role": "assistant", "content": text(5)}]
        records.append({"id": f"c{i}", "messages": messages, "meta": {"source": f"t.jsonl:{i}"}})
    return records


def conversation(record_id: str, exchanges: int, question: int = 5, answer: int = 5, system: str = "Be kind.") -> dict:
    """A support chat whose questions and answers repeat a phrase `question` and `answer` times."""
    messages = [{"role": "system", "content": system}] if system else []
    for k in range(exchanges):
        messages.append({"role": "user", "content": f"Question {k}: " + "where is my order " * question})
        messages.append({"role": "assistant", "content": f"Answer {k}: " + "please wait two days " * answer})
    return {"id": record_id, "messages": messages, "meta": {"category": "billing"}, "weight": 2.0}


@pytest.mark.parametrize("style", ["bytelevel", "sentencepiece"])
@pytest.mark.parametrize("template", ["gemma", "chatml", "llama3"])
def test_counts_equal_apply_chat_template_exactly(tokenizer_dirs: dict[str, Path], style: str, template: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[style])
    records = random_conversations(120)
    records.append({"id": "a-first", "messages": [{"role": "assistant", "content": "Hi!"}], "meta": {}})
    records.append({"id": "empty", "messages": [{"role": "user", "content": ""}], "meta": {}})
    result = fit_records(records, tokenizer, FitConfig(max_tokens=100_000, chat_template=template))
    assert result.records == records
    assert result.token_counts == [exact_tokens(tokenizer, r) for r in records]


def test_template_costs_are_measured_per_role(tokenizer) -> None:
    ensure_chat_template(tokenizer, "gemma")
    costs = measure_template_costs(tokenizer)
    # <bos>; <start_of_turn> user \n ... <end_of_turn> \n; the system message only adds "\n\n"
    assert costs.conversation == 1 and costs.leading_system == len(tokenizer.tokenize("\n\n"))
    assert costs.turn["assistant"] == len(tokenizer.tokenize("<start_of_turn>model\n<end_of_turn>\n"))
    assert costs.trims


def test_conversations_that_fit_are_kept_as_they_are(tokenizer) -> None:
    records = [conversation("short", 2)]
    result = fit_records(records, tokenizer, FitConfig(max_tokens=1024))
    assert result.records == records and result.records[0] is records[0]
    assert result.dropped == [] and (result.split_sources, result.pieces_added, result.truncated) == (0, 0, 0)


def test_split_cuts_at_turn_boundaries_into_pieces_that_fit(tokenizer) -> None:
    source = conversation("long", 12)
    whole = exact_tokens(tokenizer, source)
    max_tokens = whole // 3
    result = fit_records([source, conversation("short", 1)], tokenizer, FitConfig(max_tokens=max_tokens))
    pieces = result.records[:-1]
    assert len(pieces) >= 3 and result.records[-1]["id"] == "short"
    assert [p["id"] for p in pieces] == [f"long-p{k}" for k in range(1, len(pieces) + 1)]
    for k, piece in enumerate(pieces, start=1):
        roles = [m["role"] for m in piece["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert piece["meta"] == {"category": "billing", "group": "long", "part": k}
        assert piece["weight"] == 2.0
    assert result.token_counts[:-1] == [exact_tokens(tokenizer, p) for p in pieces]
    assert max(result.token_counts) <= max_tokens
    # every turn lands in exactly one piece, in order
    turns = [m for p in pieces for m in p["messages"][1:]]
    assert turns == source["messages"][1:]
    assert (result.split_sources, result.pieces_added, result.truncated) == (1, len(pieces) - 1, 0)
    assert len(result.records) == 2 + result.pieces_added


def test_random_conversations_all_fit_after_split_and_end_with_an_answer(tokenizer) -> None:
    records = random_conversations(200, seed=1, max_exchanges=10)
    for overflow in ("split", "truncate"):
        result = fit_records(records, tokenizer, FitConfig(max_tokens=120, overflow=overflow))
        assert result.split_sources + result.truncated > 20
        assert len(result.token_counts) == len(result.records)
        for record, tokens in zip(result.records, result.token_counts):
            assert record["messages"][-1]["role"] == "assistant"
            assert tokens == exact_tokens(tokenizer, record) <= 120
        dropped_sources = {r["id"] for r, _ in result.dropped}
        kept_sources = {r["meta"].get("group", r["id"]) for r in result.records}
        assert kept_sources | dropped_sources == {r["id"] for r in records}
        assert not kept_sources & dropped_sources  # each record kept or dropped, never both
        assert {r["meta"].get("group", r["id"]) for r, _ in result.dropped_pieces} <= kept_sources


def test_a_single_exchange_too_long_has_its_answer_cut_by_tokens(tokenizer) -> None:
    record = conversation("one", 1, answer=100)
    result = fit_records([record], tokenizer, FitConfig(max_tokens=100))
    [cut] = result.records
    assert cut["id"] == "one" and cut["meta"]["truncated"] is True and "group" not in cut["meta"]
    answer = cut["messages"][-1]["content"]
    assert record["messages"][-1]["content"].startswith(answer) and len(answer) > 20
    assert result.token_counts == [exact_tokens(tokenizer, cut)] and 100 - 3 <= result.token_counts[0] <= 100
    assert record["messages"][-1]["content"] != answer  # the input record is not modified
    assert (result.split_sources, result.pieces_added, result.truncated) == (0, 0, 1)


def test_truncate_keeps_the_leading_turns_that_fit(tokenizer) -> None:
    record = conversation("long", 12)
    result = fit_records([record], tokenizer, FitConfig(max_tokens=200, overflow="truncate"))
    [kept] = result.records
    assert kept["id"] == "long" and kept["meta"]["truncated"] is True
    assert kept["messages"] == record["messages"][: len(kept["messages"])]
    assert kept["messages"][-1]["role"] == "assistant" and len(kept["messages"]) >= 3
    assert result.token_counts == [exact_tokens(tokenizer, kept)] and result.token_counts[0] <= 200
    assert result.truncated == 1


def test_drop_moves_long_conversations_to_dropped_with_the_reason(tokenizer) -> None:
    long, short = conversation("long", 12), conversation("short", 1)
    result = fit_records([long, short], tokenizer, FitConfig(max_tokens=100, overflow="drop"))
    assert result.records == [short]
    [(dropped, reason)] = result.dropped
    assert dropped is long and reason == f"{exact_tokens(tokenizer, long)} tokens > max_tokens 100"


def test_a_prompt_that_leaves_no_room_for_an_answer_is_dropped(tokenizer) -> None:
    record = {
        "id": "huge-question",
        "messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "Because."}],
        "meta": {},
    }
    result = fit_records([record], tokenizer, FitConfig(max_tokens=64))
    assert result.records == []
    [(dropped, reason)] = result.dropped
    assert dropped is record and f"no room for {MIN_ANSWER_TOKENS} answer tokens" in reason


def test_split_drops_only_the_piece_whose_prompt_is_too_long(tokenizer) -> None:
    record = conversation("mixed", 4, question=2, answer=2)
    record["messages"][3]["content"] = "why " * 200  # the second question
    result = fit_records([record], tokenizer, FitConfig(max_tokens=60))
    ids = [p["id"] for p in result.records]
    assert ids[0] == "mixed-p1" and "mixed-p2" not in ids and len(ids) >= 2
    assert result.dropped == []  # the record is kept (through its other pieces), so it is not dropped too
    assert [(r["id"], "no room" in why) for r, why in result.dropped_pieces] == [("mixed-p2", True)]
    assert (result.split_sources, result.pieces_added) == (1, len(ids) - 1)


def test_trailing_questions_without_an_answer_are_left_out_of_pieces(tokenizer) -> None:
    record = conversation("open", 6)
    record["messages"].append({"role": "user", "content": "And one more thing?"})
    result = fit_records([record], tokenizer, FitConfig(max_tokens=exact_tokens(tokenizer, record) // 2))
    assert result.records[-1]["messages"][-1] == record["messages"][-2]


def test_disabled_fit_keeps_everything_and_counts(tokenizer) -> None:
    records = [conversation("long", 12)]
    result = fit_records(records, tokenizer, FitConfig(max_tokens=100, enabled=False))
    assert result.records == records and result.token_counts == [exact_tokens(tokenizer, records[0])]


def test_token_stats_summarise_counts() -> None:
    assert token_stats([10, 20, 30, 40, 1000]) == pytest.approx(
        {"min": 10, "median": 30.0, "p95": 808.0, "max": 1000, "total": 1100, "mean": 220.0}
    )
    assert token_stats([])["total"] == 0
