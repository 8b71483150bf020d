"""Answers-only masks for hub chat templates without `{% generation %}` markers: on faithful copies of the
published templates, the trained tokens decode to exactly each answer and its end-of-turn marker."""

from __future__ import annotations

import logging

import pytest

from chatforge.models.masks import answer_token_mask, has_generation_markers
from chatforge.models.templates import CHAT_TEMPLATES
from chatforge.core.examples import IGNORE, tokenize_conversation
from tests.models.hub_templates import FAMILIES, STRIPS_EARLIER_REASONING, Family, build_backend, family_tokenizer

SYSTEM = {"role": "system", "content": "You answer questions about the Lumo lamp."}
TURNS = [
    {"role": "user", "content": "How do I reset my password?"},
    {"role": "assistant", "content": "Click forgot password on the sign-in page."},
    {"role": "user", "content": "Thanks! And where is my invoice?"},
    {"role": "assistant", "content": "Open Billing, then Invoices: each month has a PDF."},
]


@pytest.fixture(scope="module")
def backend() -> object:
    return build_backend()


def trained_runs(input_ids: list[int], mask: list[int]) -> list[list[int]]:
    """The masked tokens as contiguous runs (one per trained turn)."""
    runs: list[list[int]] = []
    previous = 0
    for token_id, keep in zip(input_ids, mask):
        if keep and not previous:
            runs.append([])
        if keep:
            runs[-1].append(token_id)
        previous = keep
    return runs


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_masked_tokens_are_exactly_each_answer_and_its_end_of_turn_marker(backend: object, family: Family) -> None:
    tokenizer = family_tokenizer(backend, family)
    assert not has_generation_markers(tokenizer.chat_template)
    messages = ([SYSTEM] if family.system else []) + TURNS
    masked = answer_token_mask(tokenizer, messages)
    assert masked.method == "spans"
    assert masked.input_ids == list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    decoded = [tokenizer.decode(run) for run in trained_runs(masked.input_ids, masked.mask)]
    # Mistral's template writes a space before the answer: the model writes it after [/INST], so it is trained too
    assert [text.lstrip(" ") for text in decoded] == [m["content"] + family.turn_end for m in TURNS if m["role"] == "assistant"]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_single_answer_without_system_prompt_is_masked_too(backend: object, family: Family) -> None:
    tokenizer = family_tokenizer(backend, family)
    masked = answer_token_mask(tokenizer, TURNS[:2])
    decoded = [tokenizer.decode(run).lstrip(" ") for run in trained_runs(masked.input_ids, masked.mask)]
    assert decoded == [TURNS[1]["content"] + family.turn_end]


def test_a_template_that_rewrites_earlier_answers_trains_the_last_answer_as_inference_renders_it(
    backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = family_tokenizer(backend, Family("thinking", STRIPS_EARLIER_REASONING, None, "<|im_end|>", "<|im_end|>"))
    messages = [
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "<think>The user forgot it.</think>\nClick forgot password."},
        {"role": "user", "content": "And my invoice?"},
        {"role": "assistant", "content": "<think>Billing has them.</think>\nOpen Billing, then Invoices."},
    ]
    with caplog.at_level(logging.WARNING, logger="chatforge.models.masks"):
        masked = answer_token_mask(tokenizer, messages)
    assert masked.method == "last_turn"
    assert "last assistant turn only" in caplog.text
    decoded = [tokenizer.decode(run) for run in trained_runs(masked.input_ids, masked.mask)]
    assert decoded == [messages[3]["content"] + "<|im_end|>"]
    # the earlier answer is in the input as the template shows it at inference: without its reasoning
    text = tokenizer.decode(masked.input_ids)
    assert "The user forgot it" not in text and "Click forgot password." in text


def test_history_rewriting_keeps_only_turns_up_to_the_last_answer(backend: object) -> None:
    tokenizer = family_tokenizer(backend, Family("thinking", STRIPS_EARLIER_REASONING, None, "<|im_end|>", "<|im_end|>"))
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greet</think>Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>part</think>Goodbye!"},
        {"role": "user", "content": "One more thing"},
    ]
    masked = answer_token_mask(tokenizer, messages)
    assert masked.method == "last_turn"
    assert "One more thing" not in tokenizer.decode(masked.input_ids)
    assert [tokenizer.decode(r) for r in trained_runs(masked.input_ids, masked.mask)] == ["<think>part</think>Goodbye!<|im_end|>"]


def test_templates_with_markers_keep_using_them(backend: object) -> None:
    tokenizer = family_tokenizer(backend, Family("chatml-markers", CHAT_TEMPLATES["chatml"], None, "<|im_end|>", "<|im_end|>"))
    masked = answer_token_mask(tokenizer, TURNS)
    assert masked.method == "markers"
    assert [tokenizer.decode(r) for r in trained_runs(masked.input_ids, masked.mask)] == [
        m["content"] + "<|im_end|>" for m in TURNS if m["role"] == "assistant"]


def test_training_examples_use_the_same_mask_last_assistant_and_all(backend: object) -> None:
    tokenizer = family_tokenizer(backend, FAMILIES[1])  # SmolLM2's ChatML
    example = tokenize_conversation(tokenizer, TURNS, "assistant", 4096)
    assert example.mask_method == "spans"
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert trained == "Click forgot password on the sign-in page.<|im_end|>Open Billing, then Invoices: each month has a PDF.<|im_end|>"
    last = tokenize_conversation(tokenizer, TURNS, "last_assistant", 4096)
    assert tokenizer.decode([t for t in last.labels if t != IGNORE]) == TURNS[3]["content"] + "<|im_end|>"
    everything = tokenize_conversation(tokenizer, TURNS, "all", 4096)
    assert everything.trained_tokens == len(everything.input_ids) - 1


def test_answer_text_repeated_in_the_question_is_not_confused(backend: object) -> None:
    tokenizer = family_tokenizer(backend, FAMILIES[0])  # Qwen2.5
    messages = [{"role": "user", "content": "Say: yes"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes"}]
    masked = answer_token_mask(tokenizer, messages)
    assert [tokenizer.decode(r) for r in trained_runs(masked.input_ids, masked.mask)] == ["yes<|im_end|>"] * 2


def test_end_of_turn_token_of_a_hub_template_is_the_special_token_after_an_answer(backend: object) -> None:
    from chatforge.models.templates import end_of_turn_token

    for family in FAMILIES:
        assert end_of_turn_token(family_tokenizer(backend, family)) == family.turn_end, family.name


def test_chat_template_from_a_jinja_file(backend: object, tmp_path) -> None:
    from chatforge.models.templates import ensure_chat_template
    from tests.models.hub_templates import PHI3

    path = tmp_path / "phi3.jinja"
    path.write_text(PHI3, encoding="utf-8")
    tokenizer = family_tokenizer(backend, FAMILIES[0])
    assert ensure_chat_template(tokenizer, str(path)) == str(path)
    assert tokenizer.chat_template == PHI3
    with pytest.raises(ValueError, match="no such file"):
        ensure_chat_template(tokenizer, str(tmp_path / "missing.jinja"))
